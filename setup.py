"""Build torch_moe_ops and its one C++ extension, torch_moe_ops._C.

C++ CPU kernels are always built. CUDA sources (sm_90a) are built when nvcc is
found and torch has CUDA, or forced with TORCH_MOE_OPS_CUDA=1 (0 turns them off).
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("torch_moe_ops", "csrc")


def want_cuda() -> bool:
    flag = os.environ.get("TORCH_MOE_OPS_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False
    found = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag in ("1", "on", "true", "yes"):
        if not found:
            sys.exit("TORCH_MOE_OPS_CUDA=1 but nvcc or a CUDA build of torch was not found "
                     f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")
        return True
    return found


def cuda_include_dirs():
    """Headers the CUDA build needs beyond torch's: the nvidia-* wheels' cu13
    includes (cusparse.h) and CUTLASS from the nvidia-cutlass package."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "cutlass_library/source/include",
                    "cutlass_library/source/tools/util/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def extension():
    # Kernel sources mirror ATen's tree (csrc/ATen/native/...) so that the
    # upstream patches carry these very files; csrc/ is on the include path so
    # that <ATen/native/GroupedMM.h> resolves to ours, as it will in-tree.
    native = os.path.join(CSRC, "ATen", "native")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(native, "*.cpp"))
                     + glob.glob(os.path.join(native, "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is header code that expands to `#pragma omp
    # parallel` (torch is built with AT_PARALLEL_OPENMP); without the flag every
    # parallel_for in our kernels silently runs on one thread. The soname is
    # libgomp.so.1, so the loader reuses the copy torch already loaded.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fdiagnostics-color=always", "-Wall", "-Wno-unused-function"]
    link = ["-fopenmp"]
    macros = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Kernels register through ATen's DispatchStub, whose out-of-line
        # half in libtorch_cpu was built with these slots (x86 wheels); the
        # header must see the same ones or the calls do not link.
        macros += [("HAVE_AVX512_CPU_DEFINITION", None), ("HAVE_AVX2_CPU_DEFINITION", None)]
    if want_cuda():
        # native/cuda/*.cpp: host code of the CUDA build (ATen's layout too).
        sources += sorted(glob.glob(os.path.join(native, "cuda", "*.cu")) + glob.glob(os.path.join(native, "cuda", "*.cpp")))
        macros.append(("TORCH_MOE_OPS_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                "--expt-extended-lambda", "-DTORCH_MOE_OPS_WITH_CUDA"]
        return CUDAExtension("torch_moe_ops._C", sources, define_macros=macros,
                             include_dirs=[os.path.join(ROOT, CSRC)] + cuda_include_dirs(),
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    return CppExtension("torch_moe_ops._C", sources, define_macros=macros, include_dirs=[os.path.join(ROOT, CSRC)],
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="torch_moe_ops",
    version="0.1.0",
    description="Fast, deterministic Mixture-of-Experts ops for PyTorch",
    # torch_moe_ops/distributed is a symlink to the top-level distributed/.
    packages=find_packages(include=["torch_moe_ops", "torch_moe_ops.*"]),
    package_data={"torch_moe_ops": ["data/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.14"],
)
