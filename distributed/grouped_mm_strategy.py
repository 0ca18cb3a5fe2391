"""DTensor sharding strategy for grouped_mm, as upstream writes it.

The patch series turns this module into upstream's strategy for
``aten._grouped_mm``: ``grouped_mm_single_dim_strategy`` replaces the function
of that name in torch/distributed/tensor/_ops/_matrix_ops.py (v2.14.1), with
the op and the names of the checks rewritten, and registers with upstream's own
``_valid_grouped_mm_strides`` there (see that function here for why ours
differs). So this module uses DTensor's registry and helpers only. The refusal
of placements no rule keeps is this project's and sits beside the strategy
(placement_guard.py, installed by strategies.py).

Per mesh dimension, besides everything replicated (``G`` the groups, ``M``
``K`` ``N`` the GEMM dimensions, S a sharding of any layout, Shard or
_StridedShard; offs always replicated, every rank needs every group
boundary):

=======  ============================  ======================  =============================
layout   mat_a, mat_b -> out           offs splits             shardings (mat_a, mat_b, bias)
=======  ============================  ======================  =============================
any      upstream's Partial rules      --                      P, R, P -> P and R, P, P -> P
2D x 3D  (M, K), (G, K, N) -> (M, N)   M                       N: R, S(2), S(1); K: S(1), S(1), P
3D x 2D  (G, M, K), (K, N) -> (M, N)   N                       M: S(1), R, R; K: S(2), S(0), P
2D x 2D  (M, K), (K, N) -> (G, M, N)   K                       M: S(0), R, R; N: R, S(1), S(1)
3D x 3D  (G, M, K), (G, K, N)          (no offs)               G: S(0), S(0), S(0); M; N; K
=======  ============================  ======================  =============================

The rules without a bias are v2.14.1's, in its order. The bias (G, N) is
added once per rank: it follows the output's N or G shards, stays Replicate
where the output is split along M, and is Partial where the output is (a K
split or a Partial operand) so that the ranks' biases sum to it once. A
dimension that offs splits into groups is never sharded (a group boundary
would fall between ranks); the experts of the 2D layouts neither (each rank
would need the rows, or columns, of its own experts and their offs, which a
Shard of the global tensors does not give: that is expert parallelism's
dispatch).
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import ArgsType, KwargsType, OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder, register_single_dim_strategy
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset, compute_local_stride
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate

from torch_moe_ops import _checks

__all__ = ["grouped_mm_single_dim_strategy"]


def _valid_grouped_mm_strides(
    mesh: DeviceMesh,
    op_schema: OpSchema,
    input_specs: list[DTensorSpec],
    output_specs: DTensorSpec | tuple[DTensorSpec | None, ...],
) -> bool:
    """Every rank's local operands must pass the op's own checks (the fake
    kernel's, torch_moe_ops/_checks.py)."""
    # Upstream's filter of this name (v2.14.1, kept by the patch) rejects
    # local shards whose strides are not 16-byte aligned, which its CUDA
    # kernels and its meta require of every operand. Our kernels read any
    # strides, so ours checks what they do require of the local operands,
    # through the checks themselves rather than a copy. (The checks run on
    # meta tensors here, which carry no device: device-specific stride rules
    # could not be enforced this way, one reason upstream keeps its own.)
    # The local strides are the dense ones in the global tensor's dimension
    # order, as DTensor computes them.
    def local(spec: DTensorSpec) -> torch.Tensor:
        meta = spec.tensor_meta
        local_shape, _ = compute_local_shape_and_global_offset(meta.shape, mesh, spec.placements, skip_offset=True)
        return torch.empty_strided(local_shape, compute_local_stride(meta.stride, local_shape), dtype=meta.dtype,
                                   device="meta")

    args, kwargs = op_schema.args_schema, op_schema.kwargs_schema
    present = [i < len(args) and isinstance(args[i], OpStrategy) or isinstance(kwargs.get(name), OpStrategy)
               for i, name in [(2, "offs"), (3, "bias")]]
    specs = iter(input_specs[2:])
    offs, bias = (local(next(specs)) if p else None for p in present)
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    try:
        _checks.check_grouped_mm_inputs(local(input_specs[0]), local(input_specs[1]), offs, bias, out_dtype)
    except (RuntimeError, ValueError):
        return False
    return True


@register_single_dim_strategy(
    torch.ops.moe_ops.grouped_mm.default,
    # out_dtype is in the sharding cache's key: the checks below depend on it.
    schema_info=RuntimeSchemaInfo(static_argnum=4),
    full_mesh_strategy_filter=_valid_grouped_mm_strides,
)
def grouped_mm_single_dim_strategy(
    op: OpOverload, args_schema: ArgsType, kwargs_schema: KwargsType
) -> list[list[Placement | _ShardingPlaceholder | None]]:
    mat1_meta = args_schema[0]
    if not isinstance(mat1_meta, TensorMeta):
        raise AssertionError(f"Expected TensorMeta, got {type(mat1_meta)}")
    mat2_meta = args_schema[1]
    if not isinstance(mat2_meta, TensorMeta):
        raise AssertionError(f"Expected TensorMeta, got {type(mat2_meta)}")

    def arg(index: int, name: str):
        return args_schema[index] if index < len(args_schema) else kwargs_schema.get(name)

    def meta(m: TensorMeta | None) -> torch.Tensor | None:
        if m is None:
            return None
        return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

    offs_meta, bias_meta, out_dtype = arg(2, "offs"), arg(3, "bias"), arg(4, "out_dtype")
    # Reject what the kernels reject, with their messages (the meta
    # function's checks), before any redistribution is planned.
    _checks.check_grouped_mm_inputs(
        meta(mat1_meta), meta(mat2_meta), meta(offs_meta), meta(bias_meta), out_dtype
    )

    def tensor_inputs_tail(bias: Placement | _ShardingPlaceholder) -> list:
        """offs (replicated: every rank needs every group boundary) and the
        bias (G, N), each if given. The bias is added once per rank: it
        follows the output's N or G shards, and is Partial where the output
        is, so that the ranks' biases sum to it once."""
        tail: list[Placement | _ShardingPlaceholder | None] = []
        if offs_meta is not None:
            tail.append(Replicate())
        if bias_meta is not None:
            tail.append(bias)
        return tail

    strategies: list[list[Placement | _ShardingPlaceholder | None]] = [
        [Partial(), Partial(), Replicate(), *tensor_inputs_tail(Partial())],
        [Partial(), Replicate(), Partial(), *tensor_inputs_tail(Partial())],
    ]

    mat1_ndim = len(mat1_meta.shape)
    mat2_ndim = len(mat2_meta.shape)

    if mat1_ndim == 2 and mat2_ndim == 3:
        strategies.extend(
            [
                [
                    _ShardingPlaceholder(1),
                    Replicate(),
                    _ShardingPlaceholder(2),
                    *tensor_inputs_tail(_ShardingPlaceholder(1)),
                ],
                [
                    Partial(),
                    _ShardingPlaceholder(1),
                    _ShardingPlaceholder(1),
                    *tensor_inputs_tail(Partial()),
                ],
            ]
        )

    if mat1_ndim == 3 and mat2_ndim == 2:
        strategies.extend(
            [
                [
                    Partial(),
                    _ShardingPlaceholder(2),
                    _ShardingPlaceholder(0),
                    *tensor_inputs_tail(Partial()),
                ],
                [
                    _ShardingPlaceholder(0),
                    _ShardingPlaceholder(1),
                    Replicate(),
                    *tensor_inputs_tail(Replicate()),
                ],
            ]
        )

    if mat1_ndim == 2 and mat2_ndim == 2:
        strategies.extend(
            [
                [
                    _ShardingPlaceholder(2),
                    Replicate(),
                    _ShardingPlaceholder(1),
                    *tensor_inputs_tail(_ShardingPlaceholder(1)),
                ],
                [
                    _ShardingPlaceholder(1),
                    _ShardingPlaceholder(0),
                    Replicate(),
                    *tensor_inputs_tail(Replicate()),
                ],
            ]
        )

    if mat1_ndim == 3 and mat2_ndim == 3:
        strategies.extend(
            [
                [
                    _ShardingPlaceholder(2),
                    Replicate(),
                    _ShardingPlaceholder(2),
                    *tensor_inputs_tail(_ShardingPlaceholder(1)),
                ],
                [
                    _ShardingPlaceholder(1),
                    _ShardingPlaceholder(1),
                    Replicate(),
                    *tensor_inputs_tail(Replicate()),
                ],
                [
                    Partial(),
                    _ShardingPlaceholder(2),
                    _ShardingPlaceholder(1),
                    *tensor_inputs_tail(Partial()),
                ],
                [
                    _ShardingPlaceholder(0),
                    _ShardingPlaceholder(0),
                    _ShardingPlaceholder(0),
                    *tensor_inputs_tail(_ShardingPlaceholder(0)),
                ],
            ]
        )

    return strategies
