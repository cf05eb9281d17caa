"""Slice arithmetic the quantized-loading tests share: which rows and columns of which
checkpoint matrix a rank holds, and which scale blocks cover them (written by hand, not
taken from distload)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) and columns [c0, c1) of the checkpoint matrix ``name`` (None: all of them)."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


def part(i: int, n: int, size: int) -> tuple[int, int]:
    """The ``i``-th of ``n`` equal contiguous pieces of ``size``."""
    assert size % n == 0, (size, n)
    return i * size // n, (i + 1) * size // n


def block_range(span: tuple[int, int] | None, size: int, b: int) -> slice:
    """The scale entries covering ``span`` of a dimension of ``size`` in blocks of ``b``: the span
    starts on a block boundary and ends on one or at the end (the last block may be partial)."""
    lo, hi = span if span is not None else (0, size)
    assert lo % b == 0 and (hi % b == 0 or hi == size), (span, size, b)
    return slice(lo // b, -(-hi // b))
