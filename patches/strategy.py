"""DTensor strategies, as upstream writes them now (register_single_dim_strategy):
an in-repo single-dim strategy replaces upstream's function of the same name,
its moe_ops ops renamed to the aten ops and its checks to the meta function's
helpers (carried by the compile series)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from . import names, rewrite
from .changes import declared_at, read_source

OPS_DIR = "torch/distributed/tensor/_ops"
MATRIX_OPS = f"{OPS_DIR}/_matrix_ops.py"


@dataclass
class SingleDimStrategy:
    """Replaces upstream's single-dim strategy ``function`` in ``path`` with the
    in-repo one of the same name from ``source`` (a module of distributed/ whose
    ops are those of ``family``): its moe_ops ops become the aten ops, its
    checks the meta function's helpers (carried by the compile series), which
    it imports. ``provided`` are the module-level names it uses that upstream's
    module already defines (kept as upstream has them)."""

    path: str
    source: str
    family: str
    function: str
    provided: tuple[str, ...] = ()
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        src = read_source(self.source, self.declared_at)
        new = rewrite.definitions(src, self.source, [self.function], provided=self.provided)
        aten = native_functions.upstream_names()
        new = re.sub(r"\btorch\.ops\.moe_ops\.(\w+)\.default\b", lambda m: f"aten.{aten[m.group(1)]}.default", new)
        checks = {**names.shared_checks(self.family), **names.family_checks(self.family)}
        new, used = rewrite.rename(new, self.source, checks, module_alias="_checks")
        text = rewrite.replace_definitions(upstream, self.path, [self.function], new)
        if not used:
            return text
        # Upstream, the checks are the meta function's helpers (compile series).
        imports = "".join(f"    {name},\n" for name in sorted(used))
        return rewrite.replace_once(text, "from torch._ops import OpOverload\n",
                                    f"from torch._meta_registrations import (\n{imports})\n"
                                    "from torch._ops import OpOverload\n", self.path)
