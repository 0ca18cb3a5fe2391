"""The data model of the series: a Series is a list of Patches (one commit
each, its message a file under patches/messages), a Patch a list of changes
to PyTorch v2.14.1 paths. Every change has ``path`` (the upstream file),
``sources`` (the in-repo files it reads) and ``apply(text) -> text`` (text is
None for a new file). The kinds of change are: Copy and Edit here; the yaml
edits derived from the op declaration (native_yaml.py); the meta functions
(meta.py), OpInfos (opinfo.py) and DTensor strategies (strategy.py)
generated from our Python.

Paths in ``source`` are relative to the repository root.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import rewrite
from .errors import PatchError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "messages")


# Sources as the PRs before some later PR see them: path -> (old, new) edits that take that PR's code out
# (registered by its stage module, e.g. patches/float8_weights_stages.py, whose Copies apply the same
# edits first: Copy.before). The spans that earlier PRs' edits are cut from read these texts, so that an
# edit anchors on what its Copy holds.
SOURCES_BEFORE: dict[str, list[tuple[str, str]]] = {}


def source_text(path: str) -> str:
    """The in-repo file path as the spans below see it (SOURCES_BEFORE applied)."""
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        text = f.read()
    for old, new in SOURCES_BEFORE.get(path, ()):
        text = rewrite.replace_once(text, old, new, path)
    return text


def source_span(path: str, start: str, stop: str) -> str:
    """The text of the in-repo file path from start (included) to the first stop after it
    (excluded); start must occur once (the stage modules cut sources with it)."""
    text = source_text(path)
    if text.count(start) != 1:
        raise ValueError(f"{path}: {start!r} occurs {text.count(start)} times")
    begin = text.index(start)
    return text[begin:text.index(stop, begin)]


def declared_at() -> str:
    """FILE:LINE of the change being declared (the caller of its __init__), for error messages."""
    frame = sys._getframe(2)
    return f"{os.path.relpath(frame.f_code.co_filename, REPO_ROOT)}:{frame.f_lineno}"


def read_source(source: str, declared: str) -> str:
    path = os.path.join(REPO_ROOT, source)
    if not os.path.isfile(path):
        file, line = declared.rsplit(":", 1)
        raise PatchError(file, int(line), f"source {source} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


@dataclass
class Copy:
    """A new upstream file, byte-identical to an in-repo source; or, for a
    file that a stack adds over several PRs, that file as one PR leaves it.

    ``before``: (old, new) anchored edits of the source itself, applied
    first (a later PR's code, wherever it sits, #if blocks included);
    ``undefine``: macros whose ``#if defined(MACRO)`` blocks are not in this
    PR (their ``#else`` branches are); ``edits``: (old, new) anchored edits of
    the rest; ``drop_lines``: lines, as they read without their indentation,
    left out wherever they remain after the edits (a later PR's one-line
    annotations, such as a loop's unrolling pragma, which no anchor could
    name once each); ``update``: the file exists (an earlier PR of the series
    added it) and this PR replaces it by the new text. The series' last
    version of every file is the source itself (test_patches checks)."""

    path: str
    source: str
    undefine: tuple[str, ...] = ()
    edits: list[tuple[str, str]] = field(default_factory=list)
    update: bool = False
    declared_at: str = field(default_factory=declared_at)
    before: list[tuple[str, str]] = field(default_factory=list)
    drop_lines: tuple[str, ...] = ()

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, text: str | None) -> str:
        if self.update and text is None:
            raise PatchError(self.path, None, "does not exist: an update needs an earlier Copy of the file")
        if text is not None and not self.update:
            raise PatchError(self.path, None, "exists upstream; a Copy may only add new files")
        out = read_source(self.source, self.declared_at)
        for old, new in self.before:
            out = rewrite.replace_once(out, old, new, self.source)
        for macro in self.undefine:
            out = undefine(out, macro, self.source)
        for old, new in self.edits:
            out = rewrite.replace_once(out, old, new, self.source)
        if self.drop_lines:
            out = "".join(line for line in out.splitlines(keepends=True) if line.strip() not in self.drop_lines)
        return out


_IF = re.compile(r"\s*#\s*if(?:def|ndef)?\b")
_ELSE = re.compile(r"\s*#\s*el(?:se|if)\b")
_ENDIF = re.compile(r"\s*#\s*endif\b")


def undefine(text: str, macro: str, path: str) -> str:
    """text as the preprocessor leaves it with macro undefined, for the
    blocks that test it: ``#if defined(MACRO)`` ... [``#else`` ...] ``#endif``
    lose their first branch and their directives; every other line and
    directive stays. A conditional that tests the macro otherwise is an error."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stack: list[str] = []  # per open conditional: "other", "drop" (macro's branch), "keep" (its #else)
    opener = re.compile(rf"\s*#\s*if\s+defined\s*\(\s*{re.escape(macro)}\s*\)\s*(//.*)?$")
    dropped = False  # a block was just left out: a blank line after it goes if one precedes it
    for number, line in enumerate(lines, 1):
        dropping = "drop" in stack
        if opener.match(line):
            stack.append("drop")
            dropped = True
            continue
        if _IF.match(line):
            if re.search(rf"\b{re.escape(macro)}\b", line):
                raise PatchError(path, number, f"undefine {macro}: only `#if defined({macro})` blocks are supported")
            stack.append("other")
        elif _ELSE.match(line) and stack and stack[-1] != "other":
            if re.match(r"\s*#\s*elif\b", line):
                raise PatchError(path, number, f"undefine {macro}: #elif in a `#if defined({macro})` block")
            stack[-1] = "keep"
            continue
        elif _ENDIF.match(line) and stack:
            if stack.pop() != "other":
                continue
        if not dropping:
            if not (dropped and not line.strip() and out and not out[-1].strip()):
                out.append(line)
            dropped = False
    if stack:
        raise PatchError(path, None, f"undefine {macro}: unterminated conditional")
    return "".join(out)


@dataclass
class Edit:
    """Anchored edits to an upstream file: (old, new) pairs, each old exactly once."""

    path: str
    edits: list[tuple[str, str]]
    declared_at: str = field(default_factory=declared_at)
    sources: list[str] = field(default_factory=list)

    def apply(self, text: str | None) -> str:
        if text is None:
            raise PatchError(self.path, None, "does not exist in the base tree")
        for old, new in self.edits:
            text = rewrite.replace_once(text, old, new, self.path)
        return text


@dataclass
class Insert:
    """An in-repo source's text inserted into an upstream file right after, or
    right before, an anchor that occurs there exactly once (e.g. definitions
    added to FunctionsManual.cpp before its namespace closes)."""

    path: str
    source: str
    after: str | None = None
    before: str | None = None
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, text: str | None) -> str:
        if text is None:
            raise PatchError(self.path, None, "does not exist in the base tree")
        if (self.after is None) == (self.before is None):
            file, line = self.declared_at.rsplit(":", 1)
            raise PatchError(file, int(line), "an Insert needs exactly one of after= and before=")
        block = read_source(self.source, self.declared_at)
        anchor = self.after if self.after is not None else self.before
        return rewrite.replace_once(text, anchor, anchor + block if self.after is not None else block + anchor,
                                    self.path)


# Placeholders of the messages, filled from the op declaration so that a
# message naming a family's ops needs no edit when the family gains one:
# {KIND:FAMILY} or {KIND:FAMILY:SEPARATOR} (default ", "), where KIND is
#   ops             the aten names of the family's upstreamed ops (public ones, not backward_of)
#   new_ops         those the series adds as new entries (not `extends` of an upstream op)
#   moe_ops         new_ops under their moe_ops:: names
#   derivatives     the aten names of new_ops with derivatives
#   backward_nodes  their autograd nodes as gen_autograd names them (_moe_permute -> MoePermuteBackward0)
#   cuda_ops        the aten names of new_ops with a CUDA kernel of their own (not the CPU one's)
# In a patch that selects some of a family's ops (the ``ops=`` of its changes: a PR of one op), every
# kind lists only the selected ones.
PLACEHOLDER = re.compile(r"\{(\w+):(\w+)(?::([^{}]*))?\}")


def _declared(kind: str, family: str, where: str, selection: dict[str, set[str]] | None = None) -> list[str]:
    from torch_moe_ops import native_functions

    if family not in native_functions.families():
        raise PatchError(where, None, f"placeholder {{{kind}:{family}}}: no family {family!r} in "
                                      f"{native_functions.FAMILIES}")
    ops = [o for o in native_functions.upstreamed(family) if o.backward_of is None
           and (not selection or family not in selection or o.name in selection[family])]
    new = [o for o in ops if not o.upstream.extends]
    kinds = {
        "ops": lambda: [o.upstream.name for o in ops],
        "new_ops": lambda: [o.upstream.name for o in new],
        "moe_ops": lambda: [o.qualname for o in new],
        "derivatives": lambda: [o.upstream.name for o in new if o.upstream.derivatives],
        "backward_nodes": lambda: ["".join(w.title() for w in o.upstream.name.split("_")) + "Backward0"
                                   for o in new if o.upstream.derivatives],
        "cuda_ops": lambda: [o.upstream.name for o in new if o.has_own_cuda_kernel],
    }
    if kind not in kinds:
        raise PatchError(where, None, f"placeholder {{{kind}:{family}}}: kind must be one of {sorted(kinds)}")
    return kinds[kind]()


def fill_message(text: str, where: str, selection: dict[str, set[str]] | None = None) -> str:
    """text with its placeholders filled from the op declaration (of the ops
    ``selection`` names, for the families it names)."""
    return PLACEHOLDER.sub(lambda m: (", " if m[3] is None else m[3]).join(_declared(m[1], m[2], where, selection)),
                           text)


@dataclass
class Patch:
    """One commit: its message (a file under patches/messages: the title, a
    blank line, the summary, and a `Test Plan:` section; lists of a family's
    ops are placeholders, see PLACEHOLDER) and its changes."""

    message: str
    changes: list

    @property
    def selection(self) -> dict[str, set[str]]:
        """family -> the ops its changes select (``ops=``), for the families a change selects ops of."""
        out: dict[str, set[str]] = {}
        for change in self.changes:
            family, ops = getattr(change, "family", None), getattr(change, "ops", None)
            if family and isinstance(ops, (tuple, list)) and ops:
                out.setdefault(family, set()).update(ops)
        return out

    @property
    def text(self) -> str:
        path = os.path.join(MESSAGES, self.message)
        with open(path, encoding="utf-8") as f:
            return fill_message(f.read(), os.path.relpath(path, REPO_ROOT), self.selection)

    @property
    def title(self) -> str:
        return self.text.split("\n", 1)[0]


@dataclass
class Series:
    name: str
    patches: list[Patch]


@dataclass
class Generate:
    """An upstream file (new when the base tree has none) computed from sources."""

    path: str
    sources: list[str]
    make: Callable[..., str]  # make(upstream_text_or_None, *source_texts) -> new text
    declared_at: str = field(default_factory=declared_at)

    def apply(self, text: str | None) -> str:
        return self.make(text, *(read_source(s, self.declared_at) for s in self.sources))
