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


class TensorPeak:
    """The bytes of tensor memory that a block of work allocates, exactly, from the profiler's
    allocation events (``profile_memory=True``): each event carries the allocator's running total.
    Weights and other tensors that exist before the block are not counted; what the block frees of
    them lowers the total. Unlike the peak RSS (tens of MB of noise from the allocator's and the
    kernel's page handling), this is deterministic: the same work gives the same bytes. ``bytes()`` counts from
    the profiler's start and a window from its own start; both include whatever else the process
    allocates meanwhile (inside the full test suite, 107-116 KB more than the work's own, cause not
    traced).

        with TensorPeak() as peak:
            work()
        peak.bytes(), peak.bytes(start_ns, end_ns)  # over the block, or above the level at start_ns within a window

    Windows take ``time.time_ns()`` stamps (the profiler's clock on Linux).
    """

    def __enter__(self) -> TensorPeak:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from torch._C._profiler import _EventType

        self._prof.__exit__(*exc)
        events, stack = [], list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.total_allocated))
        events.sort()
        self.events = events  # (time ns, bytes allocated in all since the block began)

    def bytes(self, start_ns: int | None = None, end_ns: int | None = None) -> int:
        """Peak bytes allocated over the block, or within [start_ns, end_ns] above the level at start_ns."""
        if start_ns is None:
            return max([0] + [total for _, total in self.events])
        before = [total for t, total in self.events if t < start_ns]
        level = before[-1] if before else 0
        return max([level] + [total for t, total in self.events if start_ns <= t <= end_ns]) - level
