"""DTensor strategies, as upstream writes them now (register_single_dim_strategy):
an in-repo single-dim strategy replaces upstream's function of the same name
(or joins upstream's module after a given function), and an in-repo module of
strategies becomes a new upstream module; their moe_ops ops renamed to the
aten ops and their checks to the meta function's helpers (carried by the
compile series)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from . import names, rewrite
from .changes import declared_at, read_source
from .errors import PatchError

OPS_DIR = "torch/distributed/tensor/_ops"
MATRIX_OPS = f"{OPS_DIR}/_matrix_ops.py"

_CHECKS_IMPORT = re.compile(r"from torch\._meta_registrations import \(\n((?:    \w+,\n)+)\)\n")
_OPS_ANCHOR = "from torch._ops import OpOverload\n"


def _aten_ops(text: str) -> str:
    aten = native_functions.upstream_names()
    return re.sub(r"\btorch\.ops\.moe_ops\.(\w+)\.default\b", lambda m: f"aten.{aten[m.group(1)]}.default", text)


def _rename_checks(text: str, source: str, families: tuple[str, ...]) -> tuple[str, set[str]]:
    checks = {}
    for family in families:
        checks.update({**names.shared_checks(family), **names.family_checks(family)})
    return rewrite.rename(text, source, checks, module_alias="_checks")


def _import_checks(text: str, used: set[str], path: str) -> str:
    """Upstream, the checks are the meta function's helpers (compile series):
    one import block of them, merged with the block an earlier patch added."""
    if not used:
        return text
    found = _CHECKS_IMPORT.search(text)
    if found:
        used = used | {line.strip().rstrip(",") for line in found.group(1).splitlines()}
        text = text[:found.start()] + text[found.end():]
    imports = "".join(f"    {name},\n" for name in sorted(used))
    return rewrite.replace_once(text, _OPS_ANCHOR, f"from torch._meta_registrations import (\n{imports})\n"
                                                   + _OPS_ANCHOR, path)


@dataclass
class SingleDimStrategy:
    """Replaces upstream's single-dim strategy ``function`` in ``path`` with the
    in-repo one of the same name from ``source`` (a module of distributed/ whose
    ops are those of ``family``): its moe_ops ops become the aten ops, its
    checks the meta function's helpers (carried by the compile series), which
    it imports. ``provided`` are the module-level names it uses that upstream's
    module already defines (kept as upstream has them). With ``after``, upstream
    has no such function: it is added after upstream's definition ``after``."""

    path: str
    source: str
    family: str
    function: str
    provided: tuple[str, ...] = ()
    after: str | None = None
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        src = read_source(self.source, self.declared_at)
        new = _aten_ops(rewrite.definitions(src, self.source, [self.function], provided=self.provided))
        new, used = _rename_checks(new, self.source, (self.family,))
        if self.after is None:
            text = rewrite.replace_definitions(upstream, self.path, [self.function], new)
        else:
            if any(self.function in rewrite.top_level_names(n) for n in rewrite.parse(upstream, self.path).body):
                raise PatchError(self.path, None, f"already defines {self.function}: replace it (no after=)")
            previous = rewrite.definition(upstream, self.path, self.after)
            text = rewrite.replace_once(upstream, previous, f"{previous}\n\n{new}", self.path)
        return _import_checks(text, used, self.path)


@dataclass
class StrategyModule:
    """A new upstream module of single-dim strategies: the in-repo module
    ``source``, whole (comments and layout kept), its docstring replaced by
    ``docstring``, its moe_ops ops renamed to the aten ops (``aten =
    torch.ops.aten`` as upstream's modules spell them) and its checks, of the
    ``families``, to the meta function's helpers, imported from
    torch._meta_registrations instead of torch_moe_ops."""

    path: str
    source: str
    families: tuple[str, ...]
    docstring: str
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        if upstream is not None:
            raise PatchError(self.path, None, "exists upstream; a StrategyModule may only add a new module")
        src = read_source(self.source, self.declared_at)
        doc = rewrite.parse(src, self.source).body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and src.startswith('"""')):
            raise PatchError(self.source, 1, "a strategy module starts with its docstring")
        lines = src.splitlines(keepends=True)
        src = f'"""{self.docstring}"""\n' + "".join(lines[doc.end_lineno:])
        src = rewrite.replace_once(src, "\nfrom torch_moe_ops import _checks\n", "", self.source)
        src = rewrite.replace_once(src, "\n__all__ = ", "\naten = torch.ops.aten\n\n__all__ = ", self.source)
        src, used = _rename_checks(_aten_ops(src), self.source, self.families)
        left = [tok for tok in re.findall(r"\b(?:torch_moe_ops|moe_ops)\b", src)]
        if left:
            raise PatchError(self.source, None, f"still names {left[0]} after the rewrite: upstream has no such module")
        return _import_checks(src, used, self.path)
