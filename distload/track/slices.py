"""Loaders observable only where they read: a state dict of lazy checkpoint slices that records,
per rank, which box of which checkpoint tensor was read.

transformers' tensor-parallel loading (``from_pretrained(..., tp_plan="auto")``) reads each
checkpoint tensor's TP piece through safetensors' lazy slices, then fuses per-expert tensors into
one parameter before writing it: its writes are visible per fused parameter only, its reads per
checkpoint tensor and piece. Passing this mapping as ``state_dict=`` (with ``config=`` and no
path) makes those reads visible; a key counts as loaded when its box was read.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from ..checkpoint.directory import open_checkpoint
from .keys import Box
from .record import Recorder


class RecordedSlice:
    """One checkpoint tensor's lazy slice (safetensors' ``PySafeSlice`` protocol) that tells the
    recorder what each indexing read."""

    def __init__(self, name: str, inner, recorder: Recorder) -> None:
        self.name, self._inner, self._recorder = name, inner, recorder

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()

    def __getitem__(self, index):
        shape = tuple(self._inner.get_shape())
        value = self._inner[index]  # a read that raises counts for nothing
        self._recorder.note_read(self.name, shape, index_box(index, shape))
        return value


def index_box(index, shape: tuple[int, ...]) -> Box | None:
    """The box a basic index (slices, integers, ``...``) takes of a tensor of ``shape``; None when
    it is no box (a stepped slice).

    Example:
        >>> index_box((slice(16, 32), slice(None)), (32, 64))
        ((16, 32), (0, 64))
        >>> index_box(..., (4,))
        ((0, 4),)
    """
    parts = list(index) if isinstance(index, tuple) else [index]
    if any(p is Ellipsis for p in parts):
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (len(shape) - len(parts) + 1)
    parts += [slice(None)] * (len(shape) - len(parts))
    out = []
    for p, n in zip(parts, shape):
        if isinstance(p, slice):
            start, stop, step = p.indices(n)
            if step != 1:
                return None
            out.append((start, max(start, stop)))
        elif isinstance(p, int):
            i = p + n if p < 0 else p
            out.append((i, i + 1))
        else:
            return None
    return tuple(out)


def read_slices(directory: str, recorder: Recorder) -> Mapping[str, RecordedSlice]:
    """Opens every safetensors file of ``directory`` lazily; returns name -> ``RecordedSlice``.

    Raises:
        CheckpointError: as ``open_checkpoint`` (no weights, a bad index or header, naming the file).
    """
    from safetensors import safe_open

    tensors = open_checkpoint(directory).tensors
    handles = {f: safe_open(f, "pt") for f in sorted({t.file for t in tensors.values()})}
    return _Slices({n: RecordedSlice(n, handles[t.file].get_slice(n), recorder) for n, t in tensors.items()})


class _Slices(dict):
    """A plain dict of slices (transformers iterates it like a state dict)."""

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(super().keys()))
