"""The peak memory of one CPU call, read from Linux's /proc (the tests' and the benchmarks' measure).

Writing 5 to /proc/self/clear_refs resets the process's peak resident set (VmHWM); the peak after a call minus the
resident set before it is the most memory the call held at once. Freed heap pages are handed back to the kernel
first (malloc_trim), so the call cannot reuse them unseen.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time

CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    """Hand freed heap pages back to the kernel, so that the call under test cannot reuse them unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure may undercount by what the allocator kept
        pass


def peak_memory_available() -> str | None:
    """None where the peak RSS can be reset and read (Linux, /proc/self/clear_refs writable); else why not."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except (OSError, RuntimeError) as e:
        return f"peak RSS cannot be reset here ({CLEAR_REFS} not writable or no VmHWM in /proc/self/status: {e})"
    return None


@contextlib.contextmanager
def address_space_guard(extra_bytes: int | None):
    """Let the process map at most ``extra_bytes`` more virtual memory inside the block (RLIMIT_AS), so that a
    runaway allocation fails at once (torch raises RuntimeError "can't allocate memory", Python MemoryError)
    instead of swapping or waking the OOM killer. ``None``: no guard."""
    if extra_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_kib("VmSize") * 1024 + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def measure_peak(fn, address_space: int | None = None):
    """Run ``fn()`` once; return ``(result, peak_extra_bytes, seconds)``.

    ``peak_extra_bytes`` is the process's peak resident set during the call (VmHWM, reset just before it by
    writing 5 to /proc/self/clear_refs) minus its resident set just before the call (VmRSS): the most memory the
    call held at once, its result included. It counts pages touched, so a tensor allocated but never written is
    not counted. Warm the function up on a small input first, so that loading code and starting threads do not
    count. Other threads allocating at the same time would be counted too.

    ``address_space``: see :func:`address_space_guard` (exceptions from ``fn`` propagate).
    """
    why = peak_memory_available()
    if why is not None:
        raise RuntimeError(why)
    _release_free_memory()
    with open(CLEAR_REFS, "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with address_space_guard(address_space):
        result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return result, max(peak - before, 0) * 1024, seconds
