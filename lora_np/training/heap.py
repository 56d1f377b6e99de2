"""Keep the memory of freed arrays in the process, so the next training step reuses it.

Every NumPy operation that does not write in place allocates its result; a training step of the
demo's model allocates and frees tens of megabytes of such temporaries, most of them 0.1-2 MB.
glibc's malloc, by default, hands a block above a size threshold back to the operating system
when it is freed (munmap, or trimming the top of the heap), so the next step gets the same
memory back page by page: one page fault per 4 KiB, each zeroing its page, thousands a step.
`python -m lora_np bench` counts them and measures what they cost (its "page faults" table).

`keep_freed_memory` raises both thresholds (mallopt: M_MMAP_THRESHOLD to the largest its manual
allows on a 64-bit system, 32 MiB, and M_TRIM_THRESHOLD to 1 GiB), so freed blocks below 32 MiB
stay in the heap and are handed out again without a fault. The arithmetic does not change, only
where the arrays live: every number is the same, bit for bit. The price is that the process
keeps its peak heap (up to 1 GiB free at its top) until it exits.

The same settings go into the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), where
glibc reads them when a process starts: the notebooks' kernels and other child processes get them
too. On a C library other than glibc (macOS, musl) nothing is changed.
"""

import ctypes
import ctypes.util
import os

try:
    import resource  # Unix only
except ImportError:
    resource = None

# mallopt's parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

KEEP = {M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_TRIM_THRESHOLD: 1024 * 1024 * 1024}
# glibc's starting thresholds; left alone, it raises them as large blocks are freed ("dynamic threshold")
DEFAULT = {M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024}
HEAP_VARS = {"MALLOC_MMAP_THRESHOLD_": str(KEEP[M_MMAP_THRESHOLD]),
             "MALLOC_TRIM_THRESHOLD_": str(KEEP[M_TRIM_THRESHOLD])}  # fmt: skip


def _glibc():
    """The C library as a ctypes handle when it is glibc (it has mallopt), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # only glibc has both
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def _mallopt(settings):
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


def keep_freed_memory():
    """Keep freed blocks below 32 MiB in this process (and its future children) for reuse.

    Returns True when glibc took the settings, False where there is no glibc (nothing changed).
    """
    os.environ.update(HEAP_VARS)  # read by child processes when they start
    return _mallopt(KEEP)


def return_freed_memory():
    """Set glibc's starting thresholds and hold them: freed blocks above 128 KiB go back to the system.

    The bench uses it to measure the page faults keep_freed_memory saves. (Left alone, glibc
    raises its thresholds as large blocks are freed, so a process that never calls mallopt lies
    between the two settings; set by mallopt, they stay where they are put.)
    Returns True when glibc took the settings.
    """
    for var in HEAP_VARS:
        os.environ.pop(var, None)
    return _mallopt(DEFAULT)


def minor_faults():
    """Page faults this process has taken so far that needed no disk (a fresh page zeroed), or
    None where the system does not count them."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def transparent_huge_pages():
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where unknown.

    Under "always" the kernel may back fresh memory 2 MiB at a time, one fault per huge page, so the
    faults counted above are fewer; NumPy itself asks for huge pages (madvise) for arrays of 4 MiB
    and more.
    """
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), None)
