"""instantiate_device_type_tests for CPU and CUDA that says what it skips.

``instantiate_device_type_tests(cls, scope, only_for=("cpu", "cuda"))``
generates no CUDA class at all on a machine without a CUDA device, so the
CUDA half of a device-generic test class vanishes without a trace.
``instantiate_cpu_and_cuda`` generates the CUDA class there too, with the test
names torch would give it (``..._cuda_<dtype>``), each skipped with a reason
that says that no CUDA device ran it and what a GPU run would add. With a
CUDA device it is torch's function unchanged.
"""

from __future__ import annotations

import unittest

import torch
from torch.testing._internal import common_device_type
from torch.testing._internal.common_device_type import DeviceTypeTestBase, instantiate_device_type_tests


def no_cuda_reason(cls_name: str, gpu_adds: str) -> str:
    return (f"no CUDA device: {cls_name} runs on CPU only here; what a GPU run would add: {gpu_adds}")


def _skipping_base(reason: str) -> type:
    class NoCUDADeviceTestBase(DeviceTypeTestBase):
        """device_type "cuda" whose every instantiated test skips: no device is
        touched, not even to choose one."""

        device_type = "cuda"

        @classmethod
        def get_primary_device(cls):
            return "cuda:0"

        @classmethod
        def setUpClass(cls):
            pass

        @classmethod
        def instantiate_test(cls, name, test, *, generic_cls=None):
            before = set(cls.__dict__)
            super().instantiate_test(name, test, generic_cls=generic_cls)
            for test_name in set(cls.__dict__) - before:
                if test_name.startswith("test"):
                    def skipped(self, _reason=reason):
                        raise unittest.SkipTest(_reason)

                    skipped.__name__ = test_name
                    skipped.__doc__ = getattr(cls, test_name).__doc__
                    setattr(cls, test_name, skipped)

    return NoCUDADeviceTestBase


def instantiate_cpu_and_cuda(generic_test_class, scope, *, gpu_adds: str) -> None:
    """instantiate_device_type_tests(..., only_for=("cpu", "cuda")), and
    without a CUDA device a <Name>CUDA class whose tests skip, naming what a
    GPU run would add (gpu_adds)."""
    if torch.cuda.is_available():
        instantiate_device_type_tests(generic_test_class, scope, only_for=("cpu", "cuda"))
        return
    base = _skipping_base(no_cuda_reason(generic_test_class.__name__, gpu_adds))
    # Instantiated through torch's own function (the names, @ops dtypes and
    # decorators are then exactly those of a CUDA run), with the skipping base
    # as the one CUDA test base while it runs.
    bases = common_device_type.device_type_test_bases
    saved = list(bases)
    bases.append(base)
    try:
        instantiate_device_type_tests(generic_test_class, scope, only_for=("cpu", "cuda"))
    finally:
        bases[:] = saved
