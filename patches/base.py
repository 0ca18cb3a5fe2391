"""Rebuilds the PyTorch v2.14.1 files the series touch from the installed wheel.

The PyTorch source tree is not needed: the wheel ships every file the patches
edit, under other paths. ``WHEEL_PATHS`` maps each in-tree path to its place in
the wheel; ``build_base_tree`` copies them into a directory laid out like a
PyTorch checkout. The one exception, a test expect file (the wheel ships no
test/), is rebuilt: ``REBUILT`` maps it to the script that writes it the way
its test does, run against the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch
import torchgen

from .decomp_expect import EXPECT_SCRIPT, HAS_DECOMPOSITION_EXPECT
from .errors import PatchError

UPSTREAM_VERSION = "2.14.1"

_TORCH = os.path.dirname(torch.__file__)
_TORCHGEN = os.path.dirname(torchgen.__file__)

# In-tree path -> path in the installed wheel.
WHEEL_PATHS = {
    "aten/src/ATen/native/native_functions.yaml": f"{_TORCHGEN}/packaged/ATen/native/native_functions.yaml",
    "aten/src/ATen/native/tags.yaml": f"{_TORCHGEN}/packaged/ATen/native/tags.yaml",
    "tools/autograd/derivatives.yaml": f"{_TORCHGEN}/packaged/autograd/derivatives.yaml",
    "tools/autograd/templates/Functions.cpp": f"{_TORCHGEN}/packaged/autograd/templates/Functions.cpp",
    "torch/_meta_registrations.py": f"{_TORCH}/_meta_registrations.py",
    "torch/_inductor/config.py": f"{_TORCH}/_inductor/config.py",
    "torch/_inductor/fx_passes/pre_grad.py": f"{_TORCH}/_inductor/fx_passes/pre_grad.py",
    "torch/_inductor/fx_passes/post_grad.py": f"{_TORCH}/_inductor/fx_passes/post_grad.py",
    "torch/testing/_internal/opinfo/definitions/__init__.py":
        f"{_TORCH}/testing/_internal/opinfo/definitions/__init__.py",
    "torch/distributed/tensor/_ops/__init__.py": f"{_TORCH}/distributed/tensor/_ops/__init__.py",
    "torch/distributed/tensor/_ops/_matrix_ops.py": f"{_TORCH}/distributed/tensor/_ops/_matrix_ops.py",
    "torch/nn/functional.py": f"{_TORCH}/nn/functional.py",
}

# In-tree path -> Python script that prints it, from the installed wheel.
REBUILT = {
    HAS_DECOMPOSITION_EXPECT: EXPECT_SCRIPT,
}


def rebuild(tree_path: str) -> str:
    """The text of a REBUILT file, from a fresh interpreter (what other
    modules of this process registered must not count)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", REBUILT[tree_path]], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(_TORCH))
    if result.returncode != 0:
        raise PatchError(tree_path, None, f"rebuilding it from the wheel failed:\n{result.stderr.strip()}")
    return result.stdout


def check_torch_version() -> None:
    version = torch.__version__.split("+")[0]
    if version != UPSTREAM_VERSION:
        raise PatchError(torch.__file__, None,
                         f"the series target PyTorch v{UPSTREAM_VERSION}, but torch {torch.__version__} "
                         "is installed: the base tree rebuilt from it would not be v2.14.1")


def build_base_tree(root: str) -> None:
    """Copies every file of WHEEL_PATHS into root at its in-tree path."""
    check_torch_version()
    for tree_path, wheel_path in WHEEL_PATHS.items():
        if not os.path.isfile(wheel_path):
            raise PatchError(wheel_path, None, f"missing from the torch wheel (wanted for {tree_path})")
        dest = os.path.join(root, tree_path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(wheel_path, dest)
    for tree_path in REBUILT:
        dest = os.path.join(root, tree_path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w", encoding="utf-8", newline="") as f:
            f.write(rebuild(tree_path))
