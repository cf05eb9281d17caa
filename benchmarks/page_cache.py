"""Cold-cache runs: evict checkpoint files from the page cache, and measure how much of them is resident.

``evict`` asks the kernel to drop each file's cached pages (``fsync``, then
``posix_fadvise(POSIX_FADV_DONTNEED)``), and ``resident`` counts the file's pages in memory
with ``mincore(2)`` on a read-only shared mapping (ctypes; no page is touched). ``make_cold``
does both, falls back to ``echo 1 > /proc/sys/vm/drop_caches`` (root) only where pages stay,
and says whether the files are cold enough (< 1% resident) to call a run cold; when eviction
does not work on a machine, the runner records "cold not measurable" instead of a number.
``make_warm`` reads the files through once before warm runs, so that "warm" means resident.
"""

from __future__ import annotations

import ctypes
import mmap
import os

COLD_LIMIT = 0.01
"""largest resident fraction a cold run may start with"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(b & 1 for b in range(256))
"""mincore's vector: bit 0 of each byte says the page is resident (the other bits are reserved)"""


def resident(path: str) -> tuple[int, int]:
    """Returns ``(resident pages, pages)`` of ``path`` in the page cache."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return bytes(vec).translate(_LOW_BIT).count(1), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: list[str]) -> float:
    """Fraction of all pages of ``paths`` that are in the page cache."""
    done = total = 0
    for p in paths:
        r, n = resident(p)
        done, total = done + r, total + n
    return done / total if total else 0.0


def drop_caches() -> str:
    """Tries ``echo 1 > /proc/sys/vm/drop_caches`` (root only); returns what happened."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "ok"
    except OSError as err:
        return f"failed: {err.strerror or err}"


def evict(paths: list[str]) -> dict:
    """Drops ``paths`` from the page cache with ``posix_fadvise``; returns the outcome."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"fadvise_dontneed": "ok"}


def make_warm(paths: list[str], chunk: int = 64 << 20) -> dict:
    """Reads ``paths`` through once so that a warm run finds them in the page cache (this is
    no load: no loader runs); returns the resident fraction before and after."""
    before = resident_fraction(paths)
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return {"resident_before": round(before, 5), "resident_after": round(resident_fraction(paths), 5)}


def make_cold(paths: list[str]) -> dict:
    """Evicts ``paths`` and checks them: ``{"cold": bool, "resident_before", "resident_after", ...}``.

    ``drop_caches`` (root) is tried only when ``posix_fadvise`` left pages resident: it empties
    the whole page cache, so the Python modules and shared libraries a loader opens lazily inside
    the timed interval would be read from storage too, and counted against that loader.
    """
    before = resident_fraction(paths)
    methods = evict(paths)
    after = resident_fraction(paths)
    if after >= COLD_LIMIT and os.geteuid() == 0:
        methods["drop_caches"] = drop_caches()
        after = resident_fraction(paths)
    return {"cold": after < COLD_LIMIT, "resident_before": round(before, 5), "resident_after": round(after, 5),
            **methods}
