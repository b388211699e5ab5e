"""Peak extra memory of one call, shared by the benchmarks.

CUDA: ``max_memory_allocated`` during the call minus ``memory_allocated`` before it. CPU: the
process's peak RSS during the call (VmHWM, reset to the current RSS just before it through
/proc/self/clear_refs) minus the RSS before it; where /proc cannot be used, ``ru_maxrss``,
which cannot be reset and so is valid only for the process's first large peak (run each
measurement in a fresh process).
"""

from __future__ import annotations

import re
import resource
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_extra_bytes(fn: Callable[[], T], device: torch.device | str
                     ) -> tuple[T, int, int, str]:
    """Run ``fn()`` and measure the memory it needed beyond what was allocated before.

    Returns:
        (fn's result, bytes allocated before, peak extra bytes, how it was measured).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return (out, before, torch.cuda.max_memory_allocated(device) - before,
                "cuda max_memory_allocated")
    reset = _reset_peak_rss()
    before_kib = _proc_status_kib("VmRSS")
    if not reset or before_kib is None:
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = fn()
    peak_kib = _proc_status_kib("VmHWM") if reset else None
    measure = "VmHWM (reset) - VmRSS"
    if peak_kib is None:
        peak_kib, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return out, before_kib * 1024, (peak_kib - before_kib) * 1024, measure
