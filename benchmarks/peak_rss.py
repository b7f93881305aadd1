"""Peak resident memory of a block of work on Linux, for the CPU benchmarks: the kernel's peak-RSS
counter of this process is reset, the work runs, the peak since the reset is read."""

from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); False
    when the kernel does not allow it (the peak then covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset: bool) -> float:
    """Peak resident set (MB) since :func:`reset_peak_rss` (``reset`` its result), else of the whole process."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError("VmHWM not in /proc/self/status")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
