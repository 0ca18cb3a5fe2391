"""The yaml edits of the series, each derived from the op declaration
(torch_moe_ops/native_functions.yaml): new native_functions.yaml entries,
dispatch keys added to upstream's entries, and derivatives.yaml formulas.
An op added to a family's declaration lands in its family's patch without
an edit here or in the manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from .changes import declared_at
from .errors import PatchError
from .names import DECLARATION

NATIVE_FUNCTIONS = "aten/src/ATen/native/native_functions.yaml"
DERIVATIVES = "tools/autograd/derivatives.yaml"


def _entry(text: str, path: str, key: str, name: str) -> tuple[int, int]:
    """Start and end (past its last line) of the entry ``- key: name(...)``."""
    head = f"- {key}: {name}("
    starts, at = ([0] if text.startswith(head) else []), text.find("\n" + head)
    while at >= 0:
        starts.append(at + 1)
        at = text.find("\n" + head, at + 1)
    if len(starts) != 1:
        raise PatchError(path, None, f"expected one entry {head!r}, found {len(starts)}")
    end = text.find("\n\n", starts[0])
    return starts[0], (len(text) if end < 0 else end + 1)


def _indent(lines: str) -> str:
    return "".join(f"  {line}\n" for line in lines.splitlines())


def _dispatch_lines(dispatch: dict[str, str]) -> str:
    """Keys sharing a kernel on one line ("CPU, CUDA: swizzle_mx_scale"), as upstream writes them."""
    by_kernel: dict[str, list[str]] = {}
    for key, kernel in dispatch.items():
        by_kernel.setdefault(kernel, []).append(key)
    return "".join(f"    {', '.join(keys)}: {kernel}\n" for kernel, keys in by_kernel.items())


@dataclass
class NativeFunctions:
    """native_functions.yaml entries of the family's new ops (their
    declared schema under the aten name, their dispatch), placed after the
    entry of the aten op ``after``. Dispatch keys in ``later`` are left out
    where their kernel is not also another key's (a device-generic kernel
    keeps them): a later patch adds them with Dispatch(op, keys=...), with
    the kernels it carries. ``ops`` selects some of the family's new ops (all
    when empty), for a PR of one op."""

    family: str
    after: str
    later: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    path: str = NATIVE_FUNCTIONS
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [DECLARATION]

    def new_ops(self) -> list:
        ops = [o for o in native_functions.upstreamed(self.family) if not o.upstream.extends]
        unknown = [n for n in self.ops if n not in [o.name for o in ops]]
        if unknown:
            raise PatchError(DECLARATION, None, f"{unknown} are not new upstream ops of the {self.family} family")
        ops = [o for o in ops if not self.ops or o.name in self.ops]
        if not ops:
            raise PatchError(DECLARATION, None, f"the {self.family} family declares no new upstream op")
        return ops

    def _dispatch(self, o) -> dict[str, str]:
        dispatch = o.upstream_dispatch()
        now = {k: v for k, v in dispatch.items() if k not in self.later}
        return {k: v for k, v in dispatch.items() if k in now or v in now.values()}

    def apply(self, text: str | None) -> str:
        entries = [f"- func: {o.upstream_func()}\n  variants: function\n  dispatch:\n"
                   + _dispatch_lines(self._dispatch(o)) for o in self.new_ops()]
        _, end = _entry(text, self.path, "func", self.after)
        return text[:end] + "\n" + "\n".join(entries) + text[end:]


@dataclass
class Dispatch:
    """The dispatch keys the declaration says the series adds to the
    upstream entry of op (``upstream.extends``; of a structured op, to its
    out= overload's entry, whose kernels are structured), first in its dispatch; or,
    with ``keys``, those keys of the op's upstream dispatch, added last to
    the entry an earlier NativeFunctions(later=keys) wrote without them, or
    to an upstream entry whose kernel at that key ours replaces
    (``upstream.dispatch``, its line removed)."""

    op: str
    keys: tuple[str, ...] = ()
    path: str = NATIVE_FUNCTIONS
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [DECLARATION]

    def apply(self, text: str | None) -> str:
        op = native_functions.op(self.op)
        if op.upstream is None or not (op.upstream.extends or self.keys):
            raise PatchError(DECLARATION, None, f"{self.op}: upstream.extends names no dispatch key to add")
        start, end = _entry(text, self.path, "func", op.upstream.name)
        delegate = re.search(r"^  structured_delegate: (\S+)$", text[start:end], re.M)
        if delegate:  # a structured op's kernels are its out= overload's
            start, end = _entry(text, self.path, "func", delegate[1])
        at = text.find("  dispatch:\n", start, end)
        if at < 0:
            raise PatchError(self.path, None, f"{op.upstream.name} has no dispatch to extend")
        at += len("  dispatch:\n")
        if not self.keys:
            extended = {k: op.upstream_dispatch()[k] for k in op.upstream.extends}
            return text[:at] + _dispatch_lines(extended) + text[at:]
        missing = [k for k in self.keys if k not in op.upstream_dispatch()]
        if missing:
            raise PatchError(DECLARATION, None, f"{self.op}: no {missing} kernel declared")
        # A key upstream's entry already has (upstream.dispatch: ours replaces its kernel) loses its line.
        for key in self.keys:
            line = text.find(f"    {key}: ", at, end)
            if line >= 0:
                text = text[:line] + text[text.index("\n", line) + 1:]
        while text.startswith("    ", at):  # past the entry's dispatch lines
            at = text.index("\n", at) + 1
        return text[:at] + _dispatch_lines({k: op.upstream_dispatch()[k] for k in self.keys}) + text[at:]


@dataclass
class Derivatives:
    """derivatives.yaml formulas of the family's ops (or of ``ops``): each
    existing upstream entry's body replaced by the declared one; entries of
    new ops placed before the entry of ``before``."""

    family: str | None = None
    ops: list[str] | None = None
    before: str | None = None
    path: str = DERIVATIVES
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [DECLARATION]

    def _ops(self) -> list:
        ops = [native_functions.op(n) for n in self.ops] if self.ops else native_functions.upstreamed(self.family)
        return [o for o in ops if o.upstream.derivatives]

    def apply(self, text: str | None) -> str:
        new = []
        for o in self._ops():
            if o.upstream.extends:
                start, end = _entry(text, self.path, "name", o.upstream.name)
                body = text.index("\n", start) + 1
                text = text[:body] + _indent(o.upstream.derivatives) + text[end:]
            else:
                new.append(f"- name: {o.upstream_func()}\n" + _indent(o.upstream.derivatives))
        if new:
            if self.before is None:
                raise PatchError(DECLARATION, None, f"{self.family}: new derivatives but no place (before=)")
            start, _ = _entry(text, self.path, "name", self.before)
            text = text[:start] + "\n".join(new) + "\n" + text[start:]
        return text
