"""DTensor strategies: a module of distributed/ becomes a module of
torch/distributed/tensor/_ops/, its moe_ops ops the aten ops and its checks
the meta function's helpers (carried by the compile series); and upstream's
own strategies that would take precedence over it are dropped."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from . import names, rewrite
from .changes import declared_at, read_source

OPS_DIR = "torch/distributed/tensor/_ops"
MATRIX_OPS = f"{OPS_DIR}/_matrix_ops.py"


@dataclass
class Strategy:
    """The strategy module ``source`` (of the ops of ``family``) as ``path``.
    ``drop`` is the text of its docstring that speaks of this repository (the
    paragraph saying the series rewrites it)."""

    path: str
    source: str
    family: str
    drop: str
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [self.source]

    def apply(self, upstream: str | None) -> str:
        src = read_source(self.source, self.declared_at)
        src = rewrite.replace_once(src, self.drop, "", self.source)
        aten = native_functions.upstream_names()
        src = re.sub(r"\btorch\.ops\.moe_ops\.(\w+)\.default\b",
                     lambda m: f"torch.ops.aten.{aten[m.group(1)]}.default", src)
        checks = {**names.shared_checks(self.family), **names.family_checks(self.family)}
        src, used = rewrite.rename(src, self.source, checks, module_alias="_checks")
        src = rewrite.replace_once(src, "\nfrom torch_moe_ops import _checks\n", "", self.source)
        # Upstream, the checks are the meta function's helpers (compile series).
        imports = "".join(f"    {name},\n" for name in sorted(used))
        return rewrite.replace_once(src, "import torch\n",
                                    f"import torch\nfrom torch._meta_registrations import (\n{imports})\n",
                                    self.source)


@dataclass
class DropSingleDimStrategy:
    """Drops the single-dim strategy of _grouped_mm (it takes precedence over
    op strategies) and the imports only it used."""

    path: str = MATRIX_OPS
    sources: list[str] = field(default_factory=list)
    declared_at: str = field(default_factory=declared_at)

    def apply(self, upstream: str | None) -> str:
        text = rewrite.replace_definitions(upstream, self.path,
                                           ["_valid_grouped_mm_strides", "grouped_mm_single_dim_strategy"], "")
        for old, new in [
            ("from torch.distributed.device_mesh import DeviceMesh\n", ""),
            ("from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta\n",
             "from torch.distributed.tensor._dtensor_spec import TensorMeta\n"),
            ("from torch.distributed.tensor._utils import (\n"
             "    compute_local_shape_and_global_offset,\n"
             "    compute_local_stride,\n"
             ")\n", ""),
        ]:
            text = rewrite.replace_once(text, old, new, self.path)
        return text
