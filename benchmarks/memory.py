"""Peak memory of a block of work, for the benchmarks: the resident memory of the process,
sampled every 10 ms by a thread, and on a GPU the peak that torch allocated."""

from __future__ import annotations

import os
import platform
import resource
import threading
from pathlib import Path

import torch


def rss_mib() -> float:
    """The resident memory of this process now (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class PeakMemory:
    """``with PeakMemory(device) as memory: ...``, then ``memory.result()``: the peak resident
    memory (MiB) while the block ran, how much of it the block added, and the peak CUDA memory
    torch allocated (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = rss_mib()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    def result(self) -> dict[str, float | None]:
        return {"peak_rss_mib": self.peak, "training_added_mib": self.peak - self.before,
                "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20
                                  if self.device.type == "cuda" else None)}
