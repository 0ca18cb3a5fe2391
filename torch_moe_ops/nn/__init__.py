"""Modules built on the moe_ops: ``MoE`` and its ``MoEConfig``."""

from .moe import MoE, MoEConfig, expert_activation, load_balancing_loss

__all__ = ["MoE", "MoEConfig", "expert_activation", "load_balancing_loss"]
