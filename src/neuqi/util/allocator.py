"""glibc allocator settings for a process that quantizes: one call, at process start.

Two opposite costs meet here. glibc raises its mmap threshold after large blocks are freed, so
later large tensors come from the heap and the peak RSS creeps up with every layer; a fixed
threshold (1 MiB) keeps large blocks in their own mappings, which go back to the OS when freed.
But the solver allocates and frees tens of MiB of temporaries per chunk of groups, and with the
default trim threshold (128 KiB once the mmap threshold is fixed) every free at the top of the heap
gave the pages back and every next chunk faulted them in again: measured on SmolLM2-135M, w3 g64,
19 million page faults and 52 s per layer, 44 % of its CPU time in the kernel. Keeping up to 1 GiB free at
the top of the heap (and growing it 256 MiB at a time) makes it 17 s per layer with 2.8 million
faults. Both settings are bounded, so the peak stays about one layer plus one batch.
"""

from __future__ import annotations

import sys

__all__ = ["tune_allocator"]

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # blocks this large or larger get their own mapping ...
TOP_PAD = 256 << 20  # ... unless the free top of the heap holds them: it grows by this much
TRIM_THRESHOLD = 1 << 30  # and is given back to the OS only above this

_done = False


def tune_allocator() -> None:
    """Apply the settings above once per process (a no-op off glibc and after the first call)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TOP_PAD, TOP_PAD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
