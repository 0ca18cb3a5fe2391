"""Decomposition expect entries: test/test_decomp.py's HasDecompTest lists,
in test/expect/HasDecompTest.test_has_decomposition.expect, every aten
overload that can appear in a trace (a Tensor argument or return, not
CompositeImplicitAutograd) and has no decomposition. A new op with its own
kernels and no decomposition must be added there, in sorted order, or that
test fails; this change adds the new ops of a family.

The wheel does not ship test/, so patches/base.py rebuilds the v2.14.1 file
with the test's own logic (EXPECT_SCRIPT, run in a fresh interpreter against
the installed wheel)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from torch_moe_ops import native_functions

from .changes import declared_at
from .errors import PatchError
from .names import DECLARATION

HAS_DECOMPOSITION_EXPECT = "test/expect/HasDecompTest.test_has_decomposition.expect"

# HasDecompTest.test_has_decomposition of test/test_decomp.py, printing
# instead of assertExpected. _is_cia_op is where the v2.14.1 wheel has it.
EXPECT_SCRIPT = """\
import itertools, sys
import torch
from torch._decomp import decomposition_table
from torch._export.utils import _is_cia_op

aten = torch.ops.aten


def can_appear_in_trace(op):
    if not any("Tensor" in str(a.type) for a in itertools.chain(op._schema.arguments, op._schema.returns)):
        return False
    try:
        return not _is_cia_op(op)
    except RuntimeError as e:
        if "does not exist" in str(e):
            return False
        raise


ops = set()
for name in torch._C._dispatch_get_all_op_names():
    if not name.startswith("aten::"):
        continue
    name = name[6:]
    packet, overload = name.split(".") if "." in name else (name, "default")
    ops.add(getattr(getattr(aten, packet), overload))
missing = {op for op in ops if can_appear_in_trace(op)} - decomposition_table.keys() - {aten.get_gradients.default}
sys.stdout.write("".join(sorted(op.name() + "\\n" for op in missing)))
"""


@dataclass
class DecompExpect:
    """The family's new aten ops (``ops``: those of the given declared ops
    only) added to the HasDecompTest expect file. They all have CPU/CUDA
    kernels and no decomposition, so each belongs there (overload
    ``default``: the series adds no ``.out`` variants)."""

    family: str
    ops: tuple[str, ...] = ()
    path: str = HAS_DECOMPOSITION_EXPECT
    declared_at: str = field(default_factory=declared_at)

    @property
    def sources(self) -> list[str]:
        return [DECLARATION]

    def names(self) -> list[str]:
        unknown = [n for n in self.ops if n not in [o.name for o in native_functions.upstreamed(self.family)]]
        if unknown:
            raise PatchError(DECLARATION, None, f"{unknown} are not upstreamed ops of the {self.family} family")
        ops = [o for o in native_functions.upstreamed(self.family) if not o.upstream.extends
               and (not self.ops or o.name in self.ops)]
        if not ops:
            raise PatchError(DECLARATION, None, f"the {self.family} family declares no new upstream op")
        return [f"aten::{o.upstream.name}" for o in ops]

    def apply(self, text: str | None) -> str:
        if text is None:
            raise PatchError(self.path, None, "does not exist in the base tree")
        lines = text.splitlines(keepends=True)
        if lines != sorted(lines):
            raise PatchError(self.path, None, "is not sorted: the base tree was not rebuilt as the test writes it")
        for name in self.names():
            if name + "\n" in lines:
                raise PatchError(self.path, None, f"already lists {name}")
            bisect.insort(lines, name + "\n")
        return "".join(lines)
