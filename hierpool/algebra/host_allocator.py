"""The C allocator's thresholds, raised once per process for the host algebra's large temporaries (glibc).

A batch on the host evaluates its criterion on stacks of matrices: one call allocates and frees some thirty arrays
of a few megabytes.  glibc's malloc serves a block above its mmap threshold (128 KiB at a process's start) by a
fresh ``mmap``, and hands free memory above its trim threshold at the top of a heap back to the system; either
way the next call's arrays land on pages that the kernel faults in and zeroes again, so that a large batch spends
much of its time in the kernel (measured in benchmarks/RESULTS.md, "The allocator's thresholds, twenty-first
session").

glibc raises both thresholds itself: when a block it had mmapped is freed, the mmap threshold becomes that block's
size, up to 32 MiB on 64-bit systems, and the trim threshold twice it (mallopt(3), ``M_MMAP_THRESHOLD``, "dynamic
mmap threshold").  :func:`raise_malloc_thresholds` frees one block of just under 32 MiB, never written (only the
page of glibc's header is touched), so that glibc's own rule puts the thresholds where any program that has freed
such an array has them: blocks up to 32 MiB are then reused from the heap, and up to 64 MiB free at a heap's top
is kept.  It sets nothing: where the thresholds were fixed (``mallopt``, the ``MALLOC_*_`` environment variables) or the
allocator is not glibc's, the freed block changes nothing.
"""

from __future__ import annotations

import numpy as np

#: Under glibc's largest dynamic mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB with 64-bit longs): a freed
#: mmapped block raises the threshold only where its size, header and page rounding included (and glibc's
#: ``IS_MMAPPED`` bit in the size word), is at most that; 128 KiB below it leaves room for pages of up to 64 KiB.
BLOCK_BYTES = 32 * 2**20 - 2**17

_raised = False


def raise_malloc_thresholds() -> None:
    """Free one unwritten block of :data:`BLOCK_BYTES`, once per process (module notes): glibc's dynamic rule then
    keeps large NumPy temporaries in its heaps instead of mapping and faulting them in afresh at every call.

    Called at the start of every ``hp.fit_batch`` (host or compiled: one allocation and its release) and in each
    host worker process; later calls do nothing.
    """
    global _raised
    if _raised:
        return
    _raised = True
    try:
        block = np.empty(BLOCK_BYTES, dtype=np.uint8)  # malloc, not calloc: only the header's page is touched
    except MemoryError:  # a strict overcommit or address-space limit: the thresholds stay as they are
        return
    del block
