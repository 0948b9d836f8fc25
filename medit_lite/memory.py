"""The memory a piece of work allocates: its peak and what it leaves allocated.

On CUDA, torch's allocator statistics (``torch.cuda.max_memory_allocated`` above the
allocation at the start). The CPU allocator keeps no statistics, and the growth of the
process's peak resident size (``ru_maxrss``) says nothing once the process has been
bigger before (it reads 0 for most edits), so on the CPU the work runs under
``torch.profiler`` with ``profile_memory=True``: the profiler records every allocation and
release of torch's CPU allocator with its size, and the running sum of those events in
time order is what the work holds at each moment. Its maximum is the peak, its final
value what the work retains. Memory that bypasses torch's allocator (Python objects,
NumPy arrays) is not seen; the profiled run is slower (about 1.6× for an FT-L edit on
this project's CPU), so time it separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def allocation_trace(fn: Callable[[], T]) -> tuple[T, int, int]:
    """``(fn(), peak bytes, retained bytes)`` of torch's CPU allocator during the call,
    both relative to what was allocated when it began."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return value, peak, live


def cuda_trace(device: torch.device, fn: Callable[[], T]) -> tuple[T, int, int]:
    """``(fn(), peak bytes, retained bytes)`` of the CUDA allocator on ``device``."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    value = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    return value, peak, torch.cuda.memory_allocated(device) - start


def memory_trace(device: torch.device, fn: Callable[[], T]) -> tuple[T, int, int]:
    """:func:`cuda_trace` on a CUDA device, :func:`allocation_trace` elsewhere."""
    if device.type == "cuda":
        return cuda_trace(device, fn)
    return allocation_trace(fn)
