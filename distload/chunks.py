"""PURE: cuts a rank's planned reads into chunks of a few MB, the executor's units of work.

A read's piece is a row-major byte stream of ``count`` runs of ``run`` bytes, ``stride``
apart in the file. A chunk is a byte range of that stream; it maps to one file segment per
run it touches. Chunks let several threads share one large tensor, and bound the staging
memory a read needs to one chunk.

Two ways to cut a read:
- ``flat``: any byte boundary (a multiple of the element size, or of the run when several
  runs fit in a chunk). Used when the chunk's bytes
  land unchanged in contiguous destination memory: straight into the parameter on CPU, or
  one byte copy from a staging slot on CUDA.
- by rows: whole sub-tensors (rows of the piece, or of one row when a row is larger than a
  chunk), used when the bytes need a cast, a strided destination or a comparison.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

from .plan import Read


class Chunk(NamedTuple):
    """Bytes ``[start, stop)`` of read ``read``'s piece; cut by rows, also the sub-tensor they
    form: ``piece[prefix][lo:hi]``. (A tuple: a 7 GB load on CUDA makes 3,500 of them before its
    first read, and a frozen dataclass took a third longer to set them up.)"""

    read: int
    """index of the read in the executor's list"""
    start: int
    """first byte, within the piece"""
    stop: int
    """end byte, within the piece"""
    prefix: tuple[int, ...] = ()
    """indices of the dims above the cut one (cut by rows only)"""
    lo: int = 0
    """first index along the cut dim (cut by rows only)"""
    hi: int = 0
    """end index along the cut dim (cut by rows only)"""

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def cut(index: int, read: Read, chunk_bytes: int, *, flat: bool) -> list[Chunk]:
    """Cuts read number ``index`` into chunks of at most ``chunk_bytes`` (or one element).

    By rows, the cut dim is the outermost one whose single index fits ``chunk_bytes`` (rows of
    a matrix; elements of one row when a row is larger), so a chunk is always one sub-tensor.

    Example:
        >>> from distload.checkpoint.header import TensorInfo
        >>> import torch
        >>> t = TensorInfo(name="w", file="f", dtype=torch.bfloat16, shape=(4, 8), begin=8, end=72)
        >>> r = Read(unit=0, param="w", tensor=t, offset=8, run=64, stride=64, count=1,
        ...          shape=(4, 8), dim=None, dest=(0, 0))
        >>> [(c.start, c.stop) for c in cut(0, r, 24, flat=True)]
        [(0, 24), (24, 48), (48, 64)]
        >>> [(c.prefix, c.lo, c.hi) for c in cut(0, r, 40, flat=False)]
        [((), 0, 2), ((), 2, 4)]
        >>> [(c.prefix, c.lo, c.hi) for c in cut(0, r, 8, flat=False)][:3]
        [((0,), 0, 4), ((0,), 4, 8), ((1,), 0, 4)]
    """
    total = read.nbytes
    if total == 0:
        return []
    item = read.tensor.itemsize
    if flat:  # whole runs when several fit (a strided copy takes whole runs)
        unit = read.run if read.count > 1 and read.run <= chunk_bytes else item
        step = max(unit, chunk_bytes - chunk_bytes % unit)
        return [Chunk(index, k, min(k + step, total)) for k in range(0, total, step)]
    shape = read.shape
    if not shape:
        return [Chunk(index, 0, total)]
    level = 0  # the outermost dim one index of which fits
    while level < len(shape) - 1 and math.prod(shape[level + 1:]) * item > chunk_bytes:
        level += 1
    block = math.prod(shape[level + 1:]) * item
    per = max(1, chunk_bytes // block)
    size = shape[level]
    out = []
    for outer in range(math.prod(shape[:level])):
        prefix = _unravel(outer, shape[:level])
        for lo in range(0, size, per):
            hi = min(lo + per, size)
            out.append(Chunk(index, (outer * size + lo) * block, (outer * size + hi) * block, prefix, lo, hi))
    return out


def _unravel(flat: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(dims):
        flat, i = divmod(flat, d)
        out.append(i)
    return tuple(reversed(out))


def segments(read: Read, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """Yields ``(file offset, position in the chunk, length)`` for bytes ``[start, stop)`` of the
    piece: one segment per run they touch.

    Example:
        >>> from distload.checkpoint.header import TensorInfo
        >>> import torch
        >>> t = TensorInfo(name="w", file="f", dtype=torch.uint8, shape=(3, 10), begin=100, end=130)
        >>> r = Read(unit=0, param="w", tensor=t, offset=104, run=4, stride=10, count=3,
        ...          shape=(3, 4), dim=1, dest=(0, 4))
        >>> list(segments(r, 2, 10))
        [(106, 0, 2), (114, 2, 4), (124, 6, 2)]
    """
    run, stride = read.run, read.stride
    k = start
    while k < stop:
        i, within = divmod(k, run)
        n = min(run - within, stop - k)
        yield read.offset + i * stride + within, k - start, n
        k += n
