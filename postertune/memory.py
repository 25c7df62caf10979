"""Peak memory, per phase of a run (load, cache, train, …), in MiB.

On a CUDA device: the allocator's peak (``torch.cuda.max_memory_allocated``), reset when a
phase starts. On a CPU: the process's peak resident memory (``VmHWM``), which Linux resets
to the current resident memory when ``5`` is written to ``/proc/self/clear_refs``. Where
that reset is not possible the CPU figure is the process's lifetime peak (``ru_maxrss``),
so a phase then reports at least the peak of the phases before it. Resident memory counts
the pages of memory-mapped files too, such as safetensors weights while they load.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # the clear_refs command that resets VmHWM (Linux 4.0 and later)


def resident_peak_mb() -> float:
    """This process's peak resident memory since it started or since the last reset."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def resident_mb() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_resident_peak() -> bool:
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int | None:
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    return None


class PhaseMemory:
    """Measures each phase's peak, and how far that peak rose above the memory the phase began with."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, float] = {}
        self.added: dict[str, float] = {}
        self.phase: str | None = None
        self.start_mb = 0.0

    def start(self, phase: str) -> None:
        """End the current phase, if any, and begin ``phase``."""
        self.stop()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            reset_resident_peak()
            current = resident_mb()
            self.start_mb = resident_peak_mb() if current is None else current
        self.phase = phase

    def stop(self) -> None:
        if self.phase is None:
            return
        peak = max(self.peak_mb(), self.start_mb)
        self.peaks[self.phase] = peak
        self.added[self.phase] = peak - self.start_mb
        self.phase = None

    def peak_mb(self) -> float:
        """The peak since the current phase began."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resident_peak_mb()

    def metrics(self) -> dict[str, float]:
        """``peak_memory_mb`` (the highest phase), and per phase ``peak_memory_mb_<phase>`` and
        ``added_memory_mb_<phase>`` (its peak above what it began with)."""
        self.stop()
        out = {"peak_memory_mb": round(max(self.peaks.values(), default=0.0), 1)}
        for phase, peak in self.peaks.items():
            out[f"peak_memory_mb_{phase}"] = round(peak, 1)
            out[f"added_memory_mb_{phase}"] = round(self.added[phase], 1)
        return out
