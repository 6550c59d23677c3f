"""What a logging window cost the device: time in the optimizer step and peak memory.

The optimizer step is timed with CUDA events on the current stream (no synchronisation
until the window is read, so timing does not slow training) and with the wall clock on a
CPU, where work is synchronous. Peak memory is the CUDA caching allocator's high-water
mark since the last window: allocated (tensors alive) and reserved (held from the device).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GIB = 1024**3


class SectionTimer:
    """Seconds spent in one section of every step, summed over a logging window."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextmanager
    def section(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0

    def pop_seconds(self) -> float:
        """The window's total (waits for the last recorded section on CUDA), then a new window."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def pop_peak_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GiB on a CUDA device since the last call (then reset);
    empty on a CPU."""
    if device.type != "cuda":
        return {}
    record = {
        "mem_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return record
