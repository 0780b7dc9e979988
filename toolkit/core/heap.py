"""Hand freed heap memory back to the OS between large steps (glibc ``malloc_trim``).

Why: torch's CPU tensors come from glibc malloc. Between the mmap threshold (dynamic, up to 32 MiB) and
the many same-sized activations of a layer-by-layer pass, freed blocks stay in the heap's free lists and
the resident size climbs layer after layer while the live tensors stay constant (AWQ on the demo, measured
in docs/BENCHMARKS.md, bench 2's reading). ``malloc_trim(0)`` releases every free page of
every arena (``madvise(MADV_DONTNEED)``), at the cost of page faults when the memory is reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return lib


def release_free_heap() -> bool:
    """``malloc_trim(0)`` where glibc provides it; True when memory went back to the OS."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False
