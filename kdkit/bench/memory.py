"""Peak memory a benchmark backend adds to the process, above a baseline taken before the
model is loaded: resident set size on CPUs, the torch allocator or free device memory on CUDA.
The method, and why it is measured this way, is in :mod:`kdkit.bench.measure`.
"""

from __future__ import annotations

import ctypes
import gc
import logging

import torch

__all__ = ["PeakMemory"]

log = logging.getLogger(__name__)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory above a baseline taken before the model is loaded (see module docstring)."""

    def __init__(self, device: torch.device, backend: str) -> None:
        self.device = device
        self.mode = "rss"
        if device.type == "cuda":
            self.mode = "torch" if backend in ("eager", "compiled") else "device"
        self.base = 0
        self.lowest_free = 0
        try:
            self.base = self._now()
        except OSError:
            self.mode = "none"

    def _now(self) -> int:
        if self.mode == "rss":
            _trim()
            return _status_kb("VmRSS") * 1024
        torch.cuda.synchronize(self.device)
        if self.mode == "torch":
            return torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0]

    def reset_peak(self) -> None:
        try:
            if self.mode == "rss":
                _trim()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            elif self.mode == "torch":
                torch.cuda.reset_peak_memory_stats(self.device)
        except OSError:
            log.info("cannot reset the peak RSS here; peak memory not reported")
            self.mode = "none"

    def peak_mb(self) -> float | None:
        if self.mode == "none":
            return None
        if self.mode == "rss":
            peak = _status_kb("VmHWM") * 1024 - self.base
        elif self.mode == "torch":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = self.base - torch.cuda.mem_get_info(self.device)[0]
        return max(peak, 0) / 2**20
