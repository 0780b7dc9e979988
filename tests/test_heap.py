"""toolkit.core.heap: freed heap memory goes back to the OS (glibc malloc_trim)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from toolkit.core.heap import _libc, release_free_heap


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc's malloc_trim")
def test_freed_interior_heap_pages_return_to_the_os() -> None:
    """64 KiB blocks sit below glibc's mmap threshold, so they come from the heap; freeing every other one
    leaves 128 MiB of holes the heap cannot shrink past, which malloc_trim(0) hands back page by page."""
    blocks = [bytearray(64 << 10) for _ in range(4096)]  # 256 MiB, pages touched (zero-filled)
    del blocks[::2]
    before = _rss_anon_bytes()
    assert release_free_heap() is True
    released = before - _rss_anon_bytes()
    assert released > 64 << 20, released
    assert len(blocks) == 2048 and all(len(block) == 64 << 10 for block in blocks)  # the live half is intact
