"""Keep freed memory in the process instead of handing it back to the OS at once.

Each augmentation step, decode and collate allocates and frees arrays of a few hundred KB to a
few MB, and a CPU training step frees and re-allocates its activations. glibc serves blocks of
that size from fresh mmap()ed or newly trimmed heap pages, which the kernel zero-fills on first
touch: the cassava preset at 512 px took about 250 minor page faults per photo here, a
resnet18 step at 64 px tens of thousands, and on a VM each fault costs microseconds.
Fixing glibc's mmap threshold (its largest allowed value) and raising its trim threshold keeps
those pages in the heap for the next image and step (tests/test_heap.py counts the faults).
PyTorch's CPU tuning guides reach the same end by preloading jemalloc or tcmalloc; mallopt
needs no extra library. It does nothing off glibc.

Applied by the `mixcls` command at start, and by every loader mixcls builds before its workers
fork (they inherit it; a spawned worker applies it itself). Set MIXCLS_KEEP_HEAP=0 to leave
the allocator alone. Why an environment variable and not a config key: like torch's
PYTORCH_CUDA_ALLOC_CONF it sets up the process, not the run (results are the same either way),
and one switch must reach every place that builds a loader, the memory probe's child included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed (64-bit); larger stays mmap()ed
TRIM_THRESHOLD_BYTES = 256 * 2**20  # free memory at the heap's top kept, at most
_applied: dict[int, bool] = {}  # pid -> result: a forked worker inherits the tuning, not this


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; True when applied. Forked workers inherit it."""
    pid = os.getpid()
    if pid not in _applied:
        _applied[pid] = _apply()
    return _applied[pid]


def _apply() -> bool:
    if os.environ.get("MIXCLS_KEEP_HEAP", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to do
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
