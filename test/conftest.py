import os
import sys

# test/opinfo_<family>.py and the helpers are imported by name from the tests.
sys.path.insert(0, os.path.dirname(__file__))

from _cpu import cpu_flags  # noqa: E402

# Triton's interpreter runs tl.dot as numpy's matmul, i.e. OpenBLAS, whose
# kernel is chosen per CPU or by OPENBLAS_CORETYPE (this machine's environment
# sets Haswell on a Zen 5). With the Haswell sgemm a fused and an unfused
# Triton kernel multiplying the same rows in differently shaped blocks gave
# results 1 ulp apart (test_triton_experts' bitwise checks failed); with the
# SkylakeX kernel, which Ice Lake picks itself, the same bits. Pinned where the
# CPU can run it, before numpy loads OpenBLAS. Without AVX-512 (a Zen 3, AVX2:
# OpenBLAS picks its Zen kernel, which gave the same 1 ulp differences, as did
# Haswell) the Sandybridge kernel (AVX) gives the same bits too (checked there:
# test_fp8_forward_against_float64 fails with Zen and Haswell, passes with
# Sandybridge and Nehalem), at ~1.4x the interpreter's time.
_flags = cpu_flags()
if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= _flags:
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
elif "avx" in _flags:
    os.environ["OPENBLAS_CORETYPE"] = "Sandybridge"

from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests draw the same examples on every run and machine (derandomize):
# a red CI run replays locally, and a green one is not luck of the draw. Each
# test sets max_examples for its parameter space. HYPOTHESIS_PROFILE=explore
# draws fresh random examples (and more of them) when hunting for new bugs.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, max_examples=1000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
