"""glibc's malloc, told to keep freed memory for reuse: merges and scoring on the CPU allocate
and free tensors of the same few sizes over and over.

With glibc's defaults every block above its mmap threshold (at most 32 MiB) is a fresh ``mmap``
whose pages fault in on first touch and are unmapped when freed: a 5632×2048 float32 task
vector spent 25 ms of its merge's 87 ms faulting its pages in. Measured on 2 AVX2 cores,
``bench/merge_speed.py --tools mergearena --repeat 3`` on three 0.79B checkpoints: DARE-TIES
11.0 s to 8.4 s, linear 8.3 s to 5.9 s, peak RSS +8% and +10%; CPU scoring of 40 CosmosQA rows
12.0 s to 10.9 s (with a 1 GiB threshold; 128 MiB scored the same within the run-to-run spread,
bench/README.md). Blocks from 128 MiB up (an embedding's float32 copy) are still mapped and
returned at once, because kept in the heap they fragment it: raising the threshold to 1 GiB
added another 500 MB to the linear merge's peak for no speed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

MMAP_THRESHOLD = 128 << 20  # blocks this large or larger are mapped on their own
TRIM_THRESHOLD = (2 << 30) - 1  # free memory kept at the top of the heap (an int: 2 GiB at most)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


@functools.cache
def tune_cpu_allocator() -> bool:
    """Apply the settings above, process-wide, once; only with glibc on Linux. Opt out with
    MERGEARENA_NO_MALLOC_TUNING=1. Returns whether the settings were applied."""
    if os.environ.get("MERGEARENA_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
