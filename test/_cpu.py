"""What the CPU reports, read from /proc/cpuinfo (Linux) apart from torch and
the kernels. Imports nothing heavy: conftest.py reads it before numpy loads."""


def cpu_flags() -> frozenset:
    """The flags line's words; empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()
