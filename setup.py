"""Build torch_moe_ops and its one C++ extension, torch_moe_ops._C.

C++ CPU kernels are always built. CUDA sources (sm_90a) are built when torch
has CUDA and a CUDA toolkit is found (TORCH_MOE_OPS_CUDA=auto, the default),
must be (1) or are not (0); the build prints one line saying which and why.
"""

import glob
import importlib.util
import os
import platform
import sys
from typing import Optional

from setuptools import find_packages, setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("torch_moe_ops", "csrc")
# The op declaration and its generator (library.cpp's registrations).
DECLARATION = [os.path.join("torch_moe_ops", "native_functions.yaml"),
               os.path.join("torch_moe_ops", "native_functions.py")]


def native_functions():
    """torch_moe_ops/native_functions.py, loaded by path: importing the
    package would import torch_moe_ops/__init__.py, which needs _C."""
    spec = importlib.util.spec_from_file_location("_torch_moe_ops_native_functions",
                                                  os.path.join(ROOT, DECLARATION[1]))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

# What a directory must hold to compile our CUDA sources. An nvcc on PATH is
# not enough: where it is a wrapper script outside the toolkit (as
# /usr/local/bin/nvcc on our machines), torch guesses CUDA_HOME as its parent's parent, which
# has no CUDA headers, and the build stops at "crt/host_defines.h: No such file".
TOOLKIT_FILES = ("bin/nvcc", "include/cuda_runtime.h", "include/crt/host_defines.h")


def toolkit_missing(home: str) -> Optional[str]:
    """The first of TOOLKIT_FILES that home lacks, None if it is a toolkit."""
    return next((f for f in TOOLKIT_FILES if not os.path.isfile(os.path.join(home, f))), None)


def cuda_toolkit() -> Optional[str]:
    """The CUDA toolkit to build the CUDA sources with, None for a CPU-only build.

    An explicit CUDA_HOME (or CUDA_PATH) is the only candidate, as it is for
    torch; otherwise torch's guess (from nvcc on PATH), then /usr/local/cuda.
    """
    flag = os.environ.get("TORCH_MOE_OPS_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        print("torch_moe_ops: CPU-only build (TORCH_MOE_OPS_CUDA=0)", file=sys.stderr)
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    else:
        explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        candidates = [explicit] if explicit else [cpp_extension.CUDA_HOME, "/usr/local/cuda"]
        problems = []
        for home in dict.fromkeys(c for c in candidates if c):
            missing = toolkit_missing(home)
            if missing is None:
                skipped = f" (passed over: {'; '.join(problems)})" if problems else ""
                print(f"torch_moe_ops: building the CUDA sources with the toolkit in {home}{skipped}", file=sys.stderr)
                return home
            problems.append(f"{home} has no {missing}")
        why = "no CUDA toolkit found (" + "; ".join(problems) + ")"
    if flag in ("1", "on", "true", "yes"):
        sys.exit(f"torch_moe_ops: TORCH_MOE_OPS_CUDA=1 but {why}")
    print(f"torch_moe_ops: CPU-only build: {why}; set CUDA_HOME to a CUDA toolkit to build the CUDA sources",
          file=sys.stderr)
    return None


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


# ATen compiles every source under native/cpu/ once per CPU capability, with
# these flags (cmake/Codegen.cmake), and DispatchStub picks one copy at run
# time (cpuinfo; ATEN_CPU_CAPABILITY overrides). Our kernels are built the
# same way, with the flags patches/proof.py compiles them with in-tree. The
# x86 wheels' libtorch_cpu has these three slots (HAVE_*_CPU_DEFINITION
# below); elsewhere only DEFAULT.
CPU_CAPABILITY_FLAGS_X86 = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


class BuildExtensionPerCapability(BuildExtension.with_options(use_ninja=True)):
    """BuildExtension that first writes the registrations generated from the op
    declaration (RegisterMoeOps.h, included by csrc/library.cpp) into the build
    tree, then compiles each extension's cpu_capability_sources once per
    capability, into its own object directory with that capability's flags,
    and links those objects in. (An extension has one set of flags, so these
    cannot be ordinary sources.)"""

    def build_extension(self, ext):
        generated = os.path.join(os.path.abspath(self.build_temp), "generated")
        native_functions().write_registrations_header(generated)
        if generated not in ext.include_dirs:
            ext.include_dirs.append(generated)
        for cap, flags in getattr(ext, "cpu_capabilities", {}).items():
            args = ext.extra_compile_args
            cxx = (list(args["cxx"]) if isinstance(args, dict) else list(args)) + flags + [
                f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
            ext.extra_objects = list(ext.extra_objects or []) + self.compiler.compile(
                ext.cpu_capability_sources, output_dir=os.path.join(self.build_temp, "cpu_capability", cap),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx}, depends=ext.depends)
        super().build_extension(ext)


def extension():
    # Kernel sources mirror ATen's tree (csrc/ATen/native/...) so that the
    # upstream patches carry these very files; csrc/ is on the include path so
    # that <ATen/native/GroupedMM.h> resolves to ours, as it will in-tree.
    native = os.path.join(CSRC, "ATen", "native")
    # csrc/moe/: project-only kernels (not upstreamed; patches/manifest.py
    # NOT_UPSTREAMED), outside the ATen mirror.
    # csrc/testing/: test-only ops (torch.ops.moe_ops_testing) that run the
    # CUDA kernels' bodies on the CPU; in every build, so CI tests them.
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(native, "*.cpp"))
                     + glob.glob(os.path.join(CSRC, "moe", "*.cpp")) + glob.glob(os.path.join(CSRC, "testing", "*.cpp")))
    # native/cpu/ (and moe/cpu/, project-only kernels, and testing/cpu/,
    # test-only kernels built on native/cpu/ headers): compiled once per CPU
    # capability (BuildExtensionPerCapability).
    cpu_kernels = sorted(glob.glob(os.path.join(native, "cpu", "*.cpp")) + glob.glob(os.path.join(CSRC, "moe", "cpu", "*.cpp"))
                         + glob.glob(os.path.join(CSRC, "testing", "cpu", "*.cpp")))
    # The link is skipped when no source is newer than the library: list the
    # per-capability kernels and their headers as dependencies.
    # The declaration too: it changes library.cpp's generated registrations.
    depends = cpu_kernels + sorted(glob.glob(os.path.join(native, "cpu", "*.h"))) + DECLARATION
    # -fopenmp: at::parallel_for is header code that expands to `#pragma omp
    # parallel` (torch is built with AT_PARALLEL_OPENMP); without the flag every
    # parallel_for in our kernels silently runs on one thread. The soname is
    # libgomp.so.1, so the loader reuses the copy torch already loaded.
    # -Wno-unknown-pragmas: ATen's vec headers carry `#pragma unroll` (as ATen's own build does).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fdiagnostics-color=always", "-Wall", "-Wno-unused-function",
           "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    macros = []
    if x86:
        # Kernels register through ATen's DispatchStub, whose out-of-line
        # half in libtorch_cpu was built with these slots (x86 wheels); the
        # header must see the same ones or the calls do not link.
        macros += [("HAVE_AVX512_CPU_DEFINITION", None), ("HAVE_AVX2_CPU_DEFINITION", None)]
    toolkit = cuda_toolkit()
    if toolkit is not None:
        # CUDAExtension and BuildExtension read the toolkit from this global,
        # which holds torch's guess, not necessarily the toolkit found above.
        cpp_extension.CUDA_HOME = toolkit
        # A compiler launcher (as CMake's CMAKE_CUDA_COMPILER_LAUNCHER; .ci/cached_build
        # sets .ci/compile_cache): torch's ninja rules take the nvcc command from
        # PYTORCH_NVCC, so it names this toolkit's nvcc behind the launcher.
        launcher = os.environ.get("TORCH_MOE_OPS_COMPILER_LAUNCHER")
        if launcher and "PYTORCH_NVCC" not in os.environ:
            os.environ["PYTORCH_NVCC"] = f"{launcher} {os.path.join(toolkit, 'bin', 'nvcc')}"
        # native/cuda/*.cpp: host code of the CUDA build (ATen's layout too).
        sources += sorted(glob.glob(os.path.join(native, "cuda", "*.cu")) + glob.glob(os.path.join(native, "cuda", "*.cpp")))
        macros.append(("TORCH_MOE_OPS_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                "--expt-extended-lambda", "-DTORCH_MOE_OPS_WITH_CUDA"]
        ext = CUDAExtension("torch_moe_ops._C", sources, define_macros=macros,
                            include_dirs=[os.path.join(ROOT, CSRC)] + cuda_include_dirs(),
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link, depends=depends)
    else:
        ext = CppExtension("torch_moe_ops._C", sources, define_macros=macros, include_dirs=[os.path.join(ROOT, CSRC)],
                           extra_compile_args={"cxx": cxx}, extra_link_args=link, depends=depends)
    ext.cpu_capability_sources = cpu_kernels
    ext.cpu_capabilities = CPU_CAPABILITY_FLAGS_X86 if x86 else {"DEFAULT": []}
    return ext


setup(
    name="torch_moe_ops",
    version="0.1.0",
    description="Fast, deterministic Mixture-of-Experts ops for PyTorch",
    # torch_moe_ops/distributed is a symlink to the top-level distributed/.
    packages=find_packages(include=["torch_moe_ops", "torch_moe_ops.*"]),
    package_data={"torch_moe_ops": ["data/*.json", "native_functions.yaml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionPerCapability},
    python_requires=">=3.10",
    install_requires=["torch>=2.14"],
)
