"""Refuse, with a clear error, a placement that a single-dim strategy cannot keep.

DTensor's single-dim strategies (``register_single_dim_strategy``) list what an
op accepts per mesh dimension; DTensor then expands them to the mesh and
redistributes the inputs to the cheapest match. A Shard input that no rule
keeps is all-gathered (or moved by an all-to-all) silently. For the moe_ops
ops that is almost always a mistake (experts or tokens sharded where expert
parallelism's dispatch was meant), so ``guard_placements`` wraps an op's
registered strategy: before any candidate is accepted it checks, per mesh
dimension, that one rule keeps every Shard input where it is, and raises a
``ValueError`` naming the argument, its placement and why otherwise.

What the guard lets DTensor do on its own: reduce a Partial input (all-reduce
or reduce-scatter: what a Partial is for) and chunk a Replicate input (local,
no communication). What it refuses: moving a Shard input, and turning a
Replicate input Partial (DTensor would divide it by the mesh size: a bias
added once per rank, silently rescaled), which the user must place.

The guard is this project's contract, not upstream's: upstream DTensor
redistributes implicitly, so the strategies themselves (grouped_mm_strategy.py,
strategies.py) are written as upstream writes them and the guard sits beside
them. It runs as the strategy's ``full_mesh_strategy_filter``, the one hook of
the single-dim expansion that sees the inputs' current placements; the op's
own filter (e.g. grouped_mm's stride filter) still runs after it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo, TupleStrategy
from torch.distributed.tensor._ops.single_dim_strategy import _PreparedSingleDimStrategy
from torch.distributed.tensor._ops.utils import is_tensor_shardable
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

__all__ = ["Explanation", "guard_placements", "meta_tensor", "named_args", "static_schema_info"]

# (why_not, dims): why_not maps (input name, tensor dim) to the reason that
# Shard of that dim cannot be kept, and (input name, "partial") to the reason
# the input cannot stay Replicate when the sharding of the others makes it
# Partial; dims maps an input name to the names of its dimensions.
Explanation = tuple[dict, dict]
# Candidates of the full mesh checked at most, for the error of step 2 of
# _Guard._verify (a few rules per mesh dimension keep the inputs in practice).
_MAX_CANDIDATES = 4096


def static_schema_info(op: torch._ops.OpOverload) -> RuntimeSchemaInfo:
    """Every non-tensor argument is part of the sharding cache's key (the rules
    and checks depend on out_dtype, recipe, activation...)."""
    arguments = op._schema.arguments
    tensor = ["Tensor" in str(a.type) for a in arguments]
    first_static = next((i for i, t in enumerate(tensor) if not t), len(arguments))
    return RuntimeSchemaInfo(static_argnum=first_static,
                             static_kwargkey=[a.name for a, t in zip(arguments, tensor) if not t])


def named_args(op: torch._ops.OpOverload, args_schema, kwargs_schema) -> dict:
    """A single-dim strategy's arguments by schema name, whether passed
    positionally, by keyword or left to their default."""
    out = {}
    for i, arg in enumerate(op._schema.arguments):
        if arg.name in kwargs_schema:
            out[arg.name] = kwargs_schema[arg.name]
        elif i < len(args_schema):
            out[arg.name] = args_schema[i]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def meta_tensor(meta: TensorMeta | None) -> torch.Tensor | None:
    """A meta tensor with the global shape, strides and dtype of a DTensor
    argument, so that the fake kernels' checks (torch_moe_ops/_checks.py) run
    on it unchanged."""
    if meta is None:
        return None
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")


def _is_sharding(p) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def _keeps(rule: Placement, current: Placement) -> bool:
    """Whether a rule's placement for an input leaves its current one alone, up
    to what needs no communication or is a Partial's own reduction."""
    if _is_sharding(current):
        return rule == current
    if isinstance(current, Replicate):
        return not isinstance(rule, Partial)
    return True


def _placement_str(p: Placement) -> str:
    if isinstance(p, _StridedShard):
        return f"_StridedShard(dim={p.dim}, split_factor={p.split_factor})"
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    return type(p).__name__ + "()"


def _placements_str(placements) -> str:
    """One placement as is; those of a mesh of several dimensions in parentheses."""
    if len(placements) == 1:
        return _placement_str(placements[0])
    return "(" + ", ".join(_placement_str(p) for p in placements) + ")"


class _Guard:
    """The full-mesh filter that refuses placements no rule keeps (see the
    module docstring), then defers to the op's own filter."""

    def __init__(self, op: torch._ops.OpOverload, info, explain: Callable[[dict], Explanation],
                 arg_names: dict[str, str]):
        self.op_name = op._schema.name.split("::")[-1]
        self.info = info  # the strategy as registered, without the guard
        self.inner = info.full_mesh_strategy_filter
        self.explain = explain
        self.arg_names = arg_names
        # The expansion calls the filter once per candidate with the same
        # op_schema: verify once per schema.
        self._verified = None

    def __call__(self, mesh, op_schema: OpSchema, input_specs: list[DTensorSpec], output_specs) -> bool:
        if self._verified is not op_schema:
            self._verify(mesh, op_schema)
            self._verified = op_schema
        current = self._current(op_schema)
        for spec, (_, placements) in zip(input_specs, current):
            if not all(_keeps(r, c) for r, c in zip(spec.placements, placements)):
                return False
        return self.inner is None or self.inner(mesh, op_schema, input_specs, output_specs)

    def _inputs(self, op_schema: OpSchema) -> list[tuple[str, OpStrategy]]:
        """(name, strategy) of the tensor inputs, in the order of the rules:
        positional arguments, then keyword ones, a tensor list's elements
        flattened (named ``scale_a[0]``...) as DTensor flattens them."""
        names = [self.arg_names.get(a.name, a.name) for a in op_schema.op._schema.arguments]
        items = [(names[i], v) for i, v in enumerate(op_schema.args_schema)]
        items += [(self.arg_names.get(n, n), v) for n, v in op_schema.kwargs_schema.items()]
        out = []
        for name, v in items:
            if isinstance(v, OpStrategy):
                out.append((name, v))
            elif isinstance(v, (TupleStrategy, list, tuple)):
                children = v.children if isinstance(v, TupleStrategy) else v
                out += [(f"{name}[{i}]", c) for i, c in enumerate(children) if isinstance(c, OpStrategy)]
        return out

    def _current(self, op_schema: OpSchema) -> list[tuple[str, tuple]]:
        """(name, current placements) of the tensor inputs (see _inputs)."""
        return [(n, v.strategies[0].output_spec.placements) for n, v in self._inputs(op_schema)]

    def _strategies(self, op_schema: OpSchema) -> list[OpStrategy]:
        return [v for _, v in self._inputs(op_schema)]

    def _verify(self, mesh, op_schema: OpSchema) -> None:
        current = self._current(op_schema)
        prepared = _PreparedSingleDimStrategy(self.info, op_schema, None)
        n_out = prepared.num_outputs
        rules = list(prepared.expanded_strategies)
        # 1. Per mesh dimension, some rule keeps every input.
        keeping_per_dim = []
        for mesh_dim in range(mesh.ndim):
            now = [p[mesh_dim] for _, p in current]
            keeping = [r for r in rules if all(_keeps(rp, c) for rp, c in zip(r[n_out:], now))]
            if not keeping:
                self._refuse(op_schema, mesh_dim, current, rules, n_out)
            keeping_per_dim.append(keeping)
        # 2. Some combination of them over the mesh gives shards the op can
        # take (shardable, and passing the op's own filter).
        strategies = self._strategies(op_schema)
        reason = None
        for combo in itertools.islice(itertools.product(*keeping_per_dim), _MAX_CANDIDATES):
            specs = [DTensorSpec(mesh, tuple(r[n_out + i] for r in combo), tensor_meta=s.tensor_meta)
                     for i, s in enumerate(strategies)]
            unshardable = [(name, spec) for (name, p), spec in zip(current, specs)
                           if not is_tensor_shardable(spec.tensor_meta.shape, spec,
                                                      allow_unbacked_sharding=self.info.allow_unbacked_sharding)
                           and not (self.info.allow_uneven_sharding and spec.placements == p)]
            if unshardable:
                name, spec = unshardable[0]
                reason = (f"{name} of sizes {list(spec.tensor_meta.shape)} has fewer entries than shards along a "
                          f"dimension placed {_placements_str(spec.placements)}")
                continue
            outputs = [DTensorSpec(mesh, tuple(r[i] for r in combo)) if combo[0][i] is not None else None
                       for i in range(n_out)]
            out_specs = outputs[0] if n_out == 1 else tuple(outputs)
            if self.inner is not None and not self.inner(mesh, op_schema, specs, out_specs):
                reason = " ".join((self.inner.__doc__ or "the op's filter rejects its local shards").split())
                reason = reason.rstrip(".")
                continue
            return
        placed = ", ".join(f"{n} {_placements_str(p)}" for n, p in current
                           if any(not isinstance(q, Replicate) for q in p))
        raise ValueError(f"{self.op_name}: the placements {placed} cannot be honoured: {reason}. Redistribute "
                         "them explicitly to placements the op accepts.")

    def _refuse(self, op_schema: OpSchema, mesh_dim: int, current, rules, n_out: int):
        args = named_args(op_schema.op, op_schema.args_meta, op_schema.kwargs_meta)
        why_not, dims = self.explain(args)
        names = [n for n, _ in current]
        now = {n: p[mesh_dim] for n, p in current}
        sharded = {n: p for n, p in now.items() if _is_sharding(p)}

        def describe(name, p):
            dim_names = dims.get(name, ())
            what = f" (its {dim_names[p.dim]} dimension)" if p.dim < len(dim_names) else ""
            return f"{name} placed {_placement_str(p)}{what} on mesh dimension {mesh_dim}"

        # One Shard input that no rule keeps, whatever the others are.
        for name, p in sharded.items():
            i = names.index(name)
            if not any(r[n_out + i] == p for r in rules):
                reason = why_not.get((name, p.dim), "no sharding of this op keeps it")
                raise ValueError(f"{self.op_name}: {describe(name, p)} cannot be honoured: {reason}. Redistribute it "
                                 "explicitly (e.g. to Replicate()) if that is what you want.")
        # A rule keeps the Shard inputs but needs a Replicate input Partial.
        for r in rules:
            ins = dict(zip(names, r[n_out:]))
            if all(ins[n] == p for n, p in sharded.items()):
                other = next(n for n in names if isinstance(now[n], Replicate) and isinstance(ins[n], Partial))
                reason = why_not.get((other, "partial"),
                                     f"the sharding that keeps it needs {other} Partial(), which DTensor would make by "
                                     "dividing it by the mesh size; place it Partial() yourself if that is meant")
                first, p = next(iter(sharded.items()))
                raise ValueError(f"{self.op_name}: {describe(first, p)} cannot be honoured with {other} placed "
                                 f"Replicate(): {reason}.")
        placed = ", ".join(f"{n} {_placement_str(p)}" for n, p in sharded.items())
        raise ValueError(
            f"{self.op_name}: no sharding of this op keeps {placed} together on mesh dimension {mesh_dim}. "
            "Redistribute them explicitly to placements the op accepts.")


def guard_placements(op: torch._ops.OpOverload, explain: Callable[[dict], Explanation],
                     arg_names: dict[str, str] | None = None) -> None:
    """Wraps the single-dim strategy registered for op with the refusal of
    placements it cannot keep. explain(args by name, tensors as TensorMeta)
    gives the reasons and dimension names of the messages. arg_names renames
    schema arguments in them as the op's own errors name them (``self`` ->
    ``mat_a``)."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    info = propagator.op_single_dim_strategy_funcs[op]
    if isinstance(info.full_mesh_strategy_filter, _Guard):  # guarded already (module reloaded)
        info = info.full_mesh_strategy_filter.info
    propagator.op_single_dim_strategy_funcs[op] = dataclasses.replace(
        info, full_mesh_strategy_filter=_Guard(op, info, explain, arg_names or {}))
