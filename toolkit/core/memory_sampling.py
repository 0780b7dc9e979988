"""Resident memory of this process, read once: the live figure, the kernel's peak, a polling sampler.

Every room that reports memory reads it here (the compress stages, the runtime measurement child,
the benchmarks), so "peak RSS" means the same thing in each record:

- `current_rss_bytes`: the resident set size now (psutil).
- `proc_status_bytes(field)`: a figure of /proc/self/status (`VmHWM`, `VmRSS`, `RssFile`, ...) in
  bytes (Linux); `read_proc_status` is the same but gives None where there is no such figure.
- `peak_rss_bytes`: the kernel's high-water mark of this process's own address space. On Linux
  that is VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a child started by a
  process holding 1 GB would report at least 1 GB. ru_maxrss is the fallback elsewhere.
- `RssSampler`: the high-water mark cannot be reset inside a process, so the peak of one phase
  (a compress stage) is sampled instead: psutil's RSS every `period_s` on a background thread,
  maximum kept. A spike shorter than the period can be missed, so it is a lower bound.
"""

from __future__ import annotations

import resource
import sys
import threading

PROC_STATUS = "/proc/self/status"


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def read_proc_status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status in bytes; None without /proc or the field."""
    try:
        with open(PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (`VmHWM`, `VmRSS`, `RssFile`, ...) in bytes.

    Raises RuntimeError when the figure is not there (no /proc, or an unknown field).
    """
    value = read_proc_status(field)
    if value is None:
        raise RuntimeError(f"{field} not in {PROC_STATUS}")
    return value


def peak_rss_bytes() -> int:
    """High-water resident memory of this process's own address space (VmHWM; ru_maxrss without /proc)."""
    value = read_proc_status("VmHWM")
    if value is not None:
        return value
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class RssSampler:
    """Maximum resident set size of this process while the `with` block runs (sampled every period)."""

    def __init__(self, period_s: float = 0.05) -> None:
        self.period_s = period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, int(process.memory_info().rss))
            if self._stop.wait(self.period_s):
                break
        self.peak_bytes = max(self.peak_bytes, int(process.memory_info().rss))

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._sample, name="bedside-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
