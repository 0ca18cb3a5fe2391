"""Integrations of the moe_ops with other libraries (imported on demand)."""
