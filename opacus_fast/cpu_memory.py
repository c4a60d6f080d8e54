"""Keep freed CPU memory in the process for reuse, instead of handing it back to the OS after every step.

Book-Keeping holds every layer's output gradient until the end of backward, so its peak memory is higher than
plain SGD's. With glibc's default malloc settings, the heap above SGD's level is returned to the OS when a step
ends and page-faulted back in during the next one: on a 2-core CPU, tens of thousands of faults per step, about
a tenth of the step time of a small ViT. Keeping freed memory (as CUDA's caching allocator does for GPU memory)
removes them; the cost is that the process keeps its peak heap mapped.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems: blocks up to this size come from the heap, which is reused
MMAP_THRESHOLD = 32 * 1024 * 1024
#: never return the top of the heap to the OS (the largest value a C int holds)
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; process-wide, idempotent.

    Blocks up to 32 MiB come from the heap and the heap is never trimmed; larger blocks are still mapped and
    unmapped one by one. Returns False (and changes nothing) where malloc is not glibc's, e.g. macOS or musl.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
