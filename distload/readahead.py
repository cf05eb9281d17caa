"""Cold files: the kernel is asked for a CUDA rank's next bytes before its readers reach them.

A reader's ``preadv`` of pages not in the page cache waits for the disk, and a few readers of a
few MB each keep the disk's queue shallow: on the H200 host, cold, 8 readers of 2 MB moved
0.93x what 16 threads of 16 MB moved. One thread walks the chunks ahead of the readers in the
order they take them and asks for each span with ``posix_fadvise(WILLNEED)``, which queues the
reads and returns, up to ``WINDOW_BYTES`` beyond the chunks the readers have taken. The
pages land in the page cache as the readers' own would, so DP replicas on one node still read
each byte from storage once. Spans whose sampled pages are all in the page cache (``mincore``)
are skipped, and a warm load starts no thread: asking for cached pages is a walk of the cache
for nothing. CPU ranks read 16 MiB chunks, which the kernel's own readahead keeps up with; asking
ahead as well made their cold loads slower (BENCHMARKS.md), so they go without.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from typing import Callable, Sequence

WINDOW_BYTES = 256 * 1024 * 1024
"""bytes asked for ahead of the readers, per node (the floor's 16 threads x 16 MB in flight): a
node's ranks share it (``window_for``), since they share the node's storage"""
SPAN_BYTES = 16 * 1024 * 1024
"""largest span one request asks for"""
SAMPLES = 2
"""pages looked at per span (it is asked for unless all are cached)"""
PROBES = 16
"""spans of a file looked at first: all cached, the file counts as warm"""
DEFAULT_REQUEST_BYTES = 128 * 1024
"""Linux's default readahead: what one request reads where sysfs says nothing"""
POLL_SECONDS = 0.002
"""how often the walker looks whether the readers caught up (it sleeps in between)"""


class Readahead:
    """Walks the cold ones of ``spans`` ahead of the readers on a thread of its own, until the end
    or ``stop``.

    Args:
        spans: ``(fd, offset, length, taken_after)`` in the order the readers take them, where
            ``taken_after`` is how many bytes the readers have taken once they took this span's
            chunks.
        taken: bytes of the chunks the readers have taken so far (read without a lock: an
            estimate is enough to pace the walk).
        window: bytes asked for ahead of ``taken`` at most (at least SPAN_BYTES, or a span
            would never be asked for).
    """

    def __init__(self, spans: Sequence[tuple[int, int, int, int]], taken: Callable[[], int], *,
                 window: int = WINDOW_BYTES) -> None:
        self._spans = spans
        self._taken = taken
        self._window = max(window, SPAN_BYTES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._walk, name="distload-readahead", daemon=True)
        self._request: dict[int, int] = {}  # fd -> bytes one request reads
        self.cold: list[tuple[int, int, int, int]] = []
        """the spans found not cached when it started"""
        self.asked = 0
        """bytes asked for"""

    def start(self) -> "Readahead":
        """Looks which spans are cold, here (a warm load starts no thread), and walks those. Never
        raises: the readers read every byte themselves anyway."""
        if not self._spans or libc is None or not hasattr(os, "posix_fadvise"):
            return self
        try:
            self.cold = _cold(self._spans)
            if self.cold:
                self._thread.start()
        except Exception:  # advice only (no thread to be had, say): the load goes on without it
            self.cold = []
        return self

    def stop(self) -> None:
        """Ends the walk (before the files' descriptors are closed)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _walk(self) -> None:
        try:
            for fd, offset, length, taken_after in self.cold:
                while taken_after - self._taken() > self._window:
                    if self._stop.wait(POLL_SECONDS):
                        return
                if self._stop.is_set():
                    return
                if fd not in self._request:  # sysfs is read once per file, not per span
                    self._request[fd] = request_bytes(fd)
                step = self._request[fd]
                for at in range(offset, offset + length, step):  # the kernel reads one step per call
                    os.posix_fadvise(fd, at, min(step, offset + length - at), os.POSIX_FADV_WILLNEED)
                self.asked += length
        except OSError:
            return  # advice only, as above


def _cold(spans: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The spans not cached, in order. Each file is mapped read-only, looked at and unmapped in
    turn; one that cannot be mapped counts as cold. A file whose probes (one page of each of up
    to PROBES spans spread over it) are all cached counts as warm without looking at every span:
    2 ms less for a warm 7 GB, 2.5% of its load on the H200."""
    by_file: dict[int, list[tuple[int, int, int, int]]] = {}
    for span in spans:
        by_file.setdefault(span[0], []).append(span)
    cold = set()
    for fd, group in by_file.items():
        try:
            size = os.fstat(fd).st_size
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) if size else None
        except OSError:
            address = None
        if address in (None, _MAP_FAILED):
            cold.update(group)
            continue
        try:
            probes = group[::max(1, len(group) // PROBES)]
            if all(_cached(address, size, offset + length // 2, 1) for _, offset, length, _ in probes):
                continue
            cold.update(span for span in group if not _cached(address, size, *span[1:3]))
        finally:
            libc.munmap(address, size)
    return [span for span in spans if span in cold]


def _cached(address: int, size: int, offset: int, length: int) -> bool:
    """Whether a span of the file mapped at ``address`` looks cached: all of up to ``SAMPLES`` pages
    spread over it, one ``mincore`` each (looking at every page costs about 40 ns a page: 15 ms
    for a warm 1.4 GB), called with the GIL held (it returns at once; handing the GIL to a reader
    and back costs more). A page past the file's end, or a failed call, counts as not cached."""
    page = mmap.PAGESIZE
    vec = ctypes.c_ubyte()
    pages = {(offset + k * length // SAMPLES) // page * page for k in range(SAMPLES)}
    for at in pages:
        if at >= size or libc.mincore(address + at, 1, ctypes.byref(vec)) != 0 or not vec.value & 1:
            return False  # bit 0: resident (the others are reserved)
    return True


_MAP_FAILED = ctypes.c_void_p(-1).value


def _open_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    # a handle of its own (its signatures), keeping the GIL: these calls return at once
    lib = ctypes.PyDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


libc = _open_libc()


def window_for(local_ranks: int) -> int:
    """One rank's share of the node's readahead window. With DP replicas on a 2-core VM (TP=2 x
    DP=4, cold), 8 ranks each 256 MiB ahead queued more than the checkpoint, and the load took
    4.25 s against 2.92 s without readahead."""
    return max(SPAN_BYTES, WINDOW_BYTES // max(1, local_ranks))


def request_bytes(fd: int) -> int:
    """The most one ``WILLNEED`` reads of the file: Linux caps each call at the larger of its
    device's readahead and its largest request (8 MB of a 48 MB call on the 2-core VM), so a
    span is asked for in steps of that. Read from sysfs; DEFAULT_REQUEST_BYTES where it is not
    there (a filesystem with no block device of its own, another kernel)."""
    dev = os.fstat(fd).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    found = []
    for base in (f"/sys/class/bdi/{number}", f"/sys/dev/block/{number}/queue",
                 f"/sys/dev/block/{number}/../queue"):  # the last: a partition's disk
        for name in ("read_ahead_kb", "max_sectors_kb"):
            try:
                with open(os.path.join(base, name)) as f:
                    found.append(int(f.read()) * 1024)
            except (OSError, ValueError):
                continue
    return max(found + [DEFAULT_REQUEST_BYTES])


def spans(chunks, reads, fds: Callable[[int], int | None]) -> list[tuple[int, int, int, int]]:
    """The file spans of ``chunks`` (in the readers' order), adjacent ones merged up to SPAN_BYTES.
    Only reads of one contiguous run are asked for (strided ones, column shards, are left to the
    readers), and only from files read with ``preadv``.

    Args:
        chunks: the executor's chunks, in the order readers take them.
        reads: the executor's reads (a chunk's ``read`` indexes them).
        fds: a read's file descriptor, or None for a pickle's.
    """
    out: list[list[int]] = []
    taken = 0
    # once per read, not per chunk: a 7 GB load has thousands of chunks, and this runs before any read
    fd_of = [fds(i) if r.count == 1 else None for i, r in enumerate(reads)]
    for c in chunks:
        n = c.nbytes
        taken += n
        fd = fd_of[c.read]
        if fd is None:
            continue
        offset = reads[c.read].offset + c.start
        last = out[-1] if out else None
        if last is not None and last[0] == fd and last[1] + last[2] == offset and last[2] + n <= SPAN_BYTES:
            last[2] += n
            last[3] = taken
        else:
            out.append([fd, offset, n, taken])
    return [tuple(s) for s in out]
