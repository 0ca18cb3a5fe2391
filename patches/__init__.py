"""Upstream staging: turns the in-repo sources into ``git format-patch`` series
against PyTorch v2.14.1. See README.md; entry point ``python -m patches.generate``."""
