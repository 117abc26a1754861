"""The memory probe of ``fastzo finetune`` (and of the benchmarks that share its loop)."""

from __future__ import annotations

import contextlib
import gc

import torch


# ---------------------------------------------------------------------------------- memory
def _rss_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim_process_memory():
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts low


class PeakMemory:
    """Peak memory of a phase: cuda max allocated, else the process's peak RSS (VmHWM).

    On Linux the RSS high-water mark is reset at the start (``/proc/self/clear_refs``), so a
    second phase in the same process reports its own peak; elsewhere ``ru_maxrss`` (process
    lifetime) is reported and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = None
        self.start_mb = None
        self.peak_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda max allocated"
            return self
        _trim_process_memory()
        self.start_mb = _rss_mb("VmRSS")
        self.kind = "peak RSS"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "peak RSS (process lifetime)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return False
        peak = _rss_mb("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "peak RSS (process lifetime)"
        self.peak_mb = peak
        return False

