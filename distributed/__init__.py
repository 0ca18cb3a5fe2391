"""Distributed MoE: DTensor sharding strategies and expert parallelism.

Importable as ``torch_moe_ops.distributed``. Parallelism stays out of the
model code in ``torch_moe_ops.nn``.
"""
