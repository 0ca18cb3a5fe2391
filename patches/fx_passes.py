"""Inductor passes: a module of torch_moe_ops/compile/ becomes a module of
torch/_inductor/fx_passes/ (``FxPassModule``), and the passes' tests a test
file of test/inductor/ (``PassTests``).

Comments and layout are kept. Every ``torch.ops.moe_ops.<op>``,
``moe_ops.<op>`` and ``moe_ops::<op>`` takes the op's aten name from the
declaration, by pattern over the whole text (code, strings, comments and
docstrings alike: a docstring naming the op names the upstream one), and
sibling imports take their upstream module names. A reference to an op
that does not go upstream (``grouped_mm_gather``, ``expert_mlp``), an import
of this package or any other mention of ``moe_ops`` left over is an error
naming the line: a rewrite whose target stays here cannot slip into the series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from . import rewrite
from .changes import declared_at, read_source
from .errors import PatchError

FX_PASSES = "torch/_inductor/fx_passes"

_OP = re.compile(r"(?<![\w.])((?:torch\.ops\.)?)moe_ops(\.|::)(\w+)")
_LEFT_OVER = re.compile(r"moe_ops")
_FROM_SIBLING = re.compile(r"^from \.(\w+) import ", re.M)
_IMPORT_SIBLING = re.compile(r"^from \. import (\w+)$", re.M)
_OTHER_IMPORT = re.compile(r"^(?:from \.\.|from torch_moe_ops|import torch_moe_ops)", re.M)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def rename_ops(text: str, path: str) -> str:
    """moe_ops op names -> aten names; an op that does not go upstream, or any other
    moe_ops left over, is an error at its line (of the source, path)."""
    upstream = native_functions.upstream_names()

    def sub(m: re.Match) -> str:
        op = m.group(3)
        if op not in upstream:
            raise PatchError(path, _line(text, m.start()),
                             f"{m.group(0)} does not go upstream (not_upstreamed in the declaration): "
                             "keep the code that names it out of the carried modules")
        return f"{m.group(1)}aten{m.group(2)}{upstream[op]}"

    out = _OP.sub(sub, text)
    left = _LEFT_OVER.search(out)
    if left:
        raise PatchError(path, _line(out, left.start()), "mentions moe_ops with no upstream spelling")
    return out


def rename_imports(text: str, path: str, modules: dict[str, str]) -> str:
    """``from .<m> import`` / ``from . import <m>`` of sibling modules -> their upstream names;
    an import from elsewhere in this package is an error."""
    other = _OTHER_IMPORT.search(text)
    if other:
        raise PatchError(path, _line(text, other.start()), "imports from torch_moe_ops outside the carried modules")

    def module(m: re.Match) -> str:
        if m.group(1) not in modules:
            raise PatchError(path, _line(text, m.start()), f"imports .{m.group(1)}, which is not carried upstream")
        return modules[m.group(1)]

    text = _FROM_SIBLING.sub(lambda m: f"from .{module(m)} import ", text)
    return _IMPORT_SIBLING.sub(lambda m: f"from . import {module(m)} as {m.group(1)}", text)


@dataclass
class FxPassModule:
    """``torch/_inductor/fx_passes/<module>.py`` from ``source`` (a module of
    torch_moe_ops/compile/): ``edits`` (anchored on the source) first, then
    sibling imports renamed by ``modules`` and ops by their aten names.

    A module that a stack grows over several PRs is carried by each as that
    PR leaves it: ``edits`` in the earlier ones, ``update=True`` (the module
    exists: an earlier PR added it) in the later ones, the last carrying the
    source itself (as Copy does for a C++ file)."""

    module: str
    source: str
    modules: dict[str, str]
    edits: list[tuple[str, str]] = field(default_factory=list)
    update: bool = False
    declared_at: str = field(default_factory=declared_at)

    @property
    def path(self) -> str:
        return f"{FX_PASSES}/{self.module}.py"

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        if self.update and upstream is None:
            raise PatchError(self.path, None, "does not exist: an update needs an earlier FxPassModule of it")
        if upstream is not None and not self.update:
            raise PatchError(self.path, None, "exists upstream; an FxPassModule adds a new module (or, with "
                                              "update=True, replaces the one an earlier PR added)")
        text = read_source(self.source, self.declared_at)
        for old, new in self.edits:
            text = rewrite.replace_once(text, old, new, self.source)
        text = rename_imports(text, self.source, self.modules)
        text = rename_ops(text, self.source)
        rewrite.parse(text, self.path)
        return text


_RUN_TESTS = '\n\n\nif __name__ == "__main__":\n    run_tests()\n'


@dataclass
class PassTests:
    """An upstream test file from the top-level definitions ``carried`` of
    ``source`` (in source order, with every module-level name they use:
    rewrite.definitions), after ``header`` (the upstream imports), with
    ``edits`` anchored on the carried text and ops by their aten names, and
    upstream's ``run_tests()`` entry point.

    With ``extends``, the file is one an earlier PR of the stack added (a
    PassTests without it): ``carried`` is appended before its ``run_tests()``
    entry point and may use what that file defines; ``header`` must be empty
    (the imports are the first PR's)."""

    path: str
    source: str
    header: str
    carried: list[str]
    edits: list[tuple[str, str]] = field(default_factory=list)
    extends: bool = False
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        if self.extends and upstream is None:
            raise PatchError(self.path, None, "does not exist yet; the first PassTests of a file adds it "
                                              "(extends=False)")
        if not self.extends and upstream is not None:
            raise PatchError(self.path, None, "exists upstream; PassTests adds a new test file (or extends=True "
                                              "one an earlier PR added)")
        if self.extends and self.header:
            file, line = self.declared_at.rsplit(":", 1)
            raise PatchError(file, int(line), "an extending PassTests takes no header: the imports are those of "
                                              "the PR that added the file")
        src = read_source(self.source, self.declared_at)
        provided: tuple[str, ...] = ()
        if self.extends:
            defined = [n for node in rewrite.parse(upstream, self.path).body for n in rewrite.top_level_names(node)]
            again = [n for n in self.carried if n in defined]
            if again:
                raise PatchError(self.path, None, f"already defines {again}: carry each definition once")
            provided = tuple(defined)
        body = rewrite.definitions(src, self.source, self.carried, provided=provided)
        for old, new in self.edits:
            body = rewrite.replace_once(body, old, new, self.source)
        body = rename_ops(body, self.source)
        if self.extends:
            text = rewrite.replace_once(upstream, _RUN_TESTS, "\n\n\n" + body.rstrip("\n") + _RUN_TESTS, self.path)
        else:
            text = self.header.rstrip("\n") + "\n\n\n" + body.rstrip("\n") + _RUN_TESTS
        rewrite.parse(text, self.path)
        return text
