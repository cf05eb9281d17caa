"""Reading a checkpoint file's bytes: descriptors, read-only maps, exact reads, and page population.

A chunk's bytes come from ``os.preadv`` (contiguous runs), from one strided copy out of a
read-only map (many short runs: a column shard's rows), or from a pickle's memory-mapped
tensor. Destinations in fresh parameter memory are populated first, in one call per chunk:
a read that faults its destination in page by page costs a fifth more.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
import warnings

import torch

from .checkpoint.files import open_regular
from .chunks import Chunk, segments
from .errors import CheckpointError
from .plan import Read

STRIDED_RUN_BYTES = 64 * 1024
"""runs shorter than this (a column shard's rows) are copied out of a read-only map of the
file: one strided copy per chunk instead of one read call per run"""
MADV_POPULATE_WRITE = 23
"""Linux 5.14+: fault a range in for writing in one call"""
MADV_DONTNEED = 4
"""drop a range's mapping (a file's pages stay in the page cache)"""
MADV_HUGEPAGE = 14
"""back a range with transparent huge pages, where the kernel's THP mode is ``madvise`` or ``always``"""
HUGE_PAGE_BYTES = 2 * 1024 * 1024


def fill(target: torch.Tensor, read: Read, chunk: Chunk, handle: "CheckpointFile | dict", *,
         view: memoryview | None = None) -> None:
    """Fills the CPU uint8 tensor ``target`` with bytes ``[chunk.start, chunk.stop)`` of ``read``.

    Args:
        view: ``target``'s bytes as a memoryview, where the caller keeps one (a staging slot's).

    Raises:
        CheckpointError: the file is shorter than the header says, or unreadable.
    """
    if isinstance(handle, dict):  # a pickle's memory-mapped tensor: copy the same runs
        flat = handle[read.tensor.name].contiguous().reshape(-1).view(torch.uint8)
        for offset, at, n in segments(read, chunk.start, chunk.stop):
            target[at:at + n].copy_(flat[offset:offset + n])
        return
    if read.count > 1 and read.run < STRIDED_RUN_BYTES and chunk.start % read.run == chunk.stop % read.run == 0:
        first, last = chunk.start // read.run, chunk.stop // read.run
        mapped = handle.mapped(read)
        begin = read.offset + first * read.stride
        rows = mapped.as_strided((last - first, read.run), (read.stride, 1), begin)
        target[:chunk.nbytes].view(last - first, read.run).copy_(rows)
        # the pages stay in the page cache; only this process's mapping of them goes, so its RSS
        # holds its shard rather than every column-sharded tensor it copied from
        _advise(mapped.data_ptr() + begin, mapped.data_ptr() + begin + (last - first - 1) * read.stride + read.run,
                MADV_DONTNEED, inward=False)
        return
    if view is None:
        view = byte_view(target)
    if read.count == 1:  # one run: one read (the common case, kept short: it runs per chunk)
        _pread_exact(handle.fd, view[:chunk.nbytes], read.offset + chunk.start, read)
        return
    for offset, at, n in segments(read, chunk.start, chunk.stop):
        _pread_exact(handle.fd, view[at:at + n], offset, read)


def byte_view(target: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a writable memoryview (no copy)."""
    return memoryview((ctypes.c_ubyte * (target.numel() * target.element_size())).from_address(
        target.data_ptr())).cast("B")


class CheckpointFile:
    """A checkpoint file open for reading, and its read-only map once a strided read needs it.

    Opened as a regular file only (``checkpoint.files.open_regular``: a FIFO swapped in after
    planning cannot block). A file truncated by someone else while it is mapped and copied ends
    the process with SIGBUS (as any memory-mapped reader would); its size is checked before each
    map read, and a ``pread`` past its end is a CheckpointError.
    """

    def __init__(self, read: Read) -> None:
        try:
            self.fd, _ = open_regular(read.tensor.file, what="safetensors file", tensor=read.tensor.name)
        except CheckpointError as err:  # deleted, replaced or locked away since its header was read
            raise CheckpointError(f"{err.message} (its header was read earlier: did it change since?)",
                                  file=err.file, tensor=err.tensor) from None
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def mapped(self, read: Read) -> torch.Tensor:
        """The whole file as a flat uint8 tensor over a read-only map."""
        with self._lock:
            if self._bytes is None:
                try:
                    self._map = mmap.mmap(self.fd, os.fstat(self.fd).st_size, prot=mmap.PROT_READ)
                except (OSError, ValueError) as err:  # an empty file cannot be mapped
                    raise CheckpointError(f"cannot map for reading: {err}", file=read.tensor.file,
                                          tensor=read.tensor.name) from None
                with warnings.catch_warnings():  # read-only memory: only ever copied from
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            if self._bytes.numel() < read.tensor.end:
                raise CheckpointError(f"file ends at byte {self._bytes.numel()}, before the tensor's data "
                                      f"(needed up to {read.tensor.end}); is it truncated?",
                                      file=read.tensor.file, tensor=read.tensor.name)
            return self._bytes

    def close(self) -> None:
        self._bytes = None  # the tensor exports the map's buffer: release it first
        if self._map is not None:
            self._map.close()
        with contextlib.suppress(OSError):  # read-only: nothing is lost, and an error here would mask another
            os.close(self.fd)


def _pread_exact(fd: int, view: memoryview, offset: int, read: Read) -> None:
    """Fills ``view`` from ``offset``, looping over short reads; EOF is a truncated file."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise CheckpointError(f"read failed at byte {offset + done}: {err.strerror or err}",
                                  file=read.tensor.file, tensor=read.tensor.name) from None
        if n == 0:
            raise CheckpointError(f"file ends at byte {offset + done}, before the tensor's data "
                                  f"(needed up to {read.tensor.end}); is it truncated?",
                                  file=read.tensor.file, tensor=read.tensor.name)
        done += n


def populate(target: torch.Tensor) -> None:
    """Faults the pages of the CPU tensor ``target`` in for writing, in one call where the kernel
    can (a no-op elsewhere, and after the first refusal)."""
    global _populate_ok
    if _populate_ok and target.numel() >= 2 * mmap.PAGESIZE:
        _populate_ok = _advise(target.data_ptr(), target.data_ptr() + target.numel(), MADV_POPULATE_WRITE,
                               inward=True)  # an older kernel refuses: the read faults pages in itself


def prefer_huge_pages(target: torch.Tensor) -> None:
    """Asks for transparent huge pages under the fresh CPU tensor ``target`` (the whole 2 MiB pages
    inside it), before anything touches it. The kernel zeroes each fresh page at its first fault;
    one fault per 2 MiB instead of 512 cut a TP=8 load's CPU by 12% on a 2-core VM (BENCHMARKS.md). A no-op
    for tensors smaller than a huge page, and after the kernel's first refusal."""
    global _huge_ok
    if _huge_ok:
        start = target.data_ptr()
        _huge_ok = _advise(start, start + target.numel() * target.element_size(), MADV_HUGEPAGE, inward=True,
                           page=HUGE_PAGE_BYTES)


def _advise(start: int, stop: int, advice: int, *, inward: bool, page: int = mmap.PAGESIZE) -> bool:
    """``madvise`` over the ``page``-sized pages of ``[start, stop)``: the whole pages inside it
    (``inward``), or every page it touches. Returns whether the kernel accepted it."""
    lo = -(-start // page) * page if inward else start // page * page
    hi = stop // page * page if inward else -(-stop // page) * page
    if _libc is None or hi <= lo:
        return _libc is not None
    return _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) == 0


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_populate_ok = _libc is not None
_huge_ok = _libc is not None
