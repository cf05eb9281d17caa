"""Recording, on one rank, which expected keys the engine's own loaders actually *wrote*.

An engine's fused-expert loader is called for every expert on every rank and returns without
writing for the experts the rank does not host; a stacked loader is called once per shard. What
counts is not the call but the bytes that arrived: while ``observe()`` is active, every tensor
operation that writes into one of the rank's parameters is seen (a ``TorchDispatchMode``), and
the piece of the checkpoint tensor it copied from is found from the source's storage, offset and
strides, relative to the tensor the weights iterator yielded. A key is loaded once writes from
its checkpoint tensor have covered its whole box (as many times as it has local copies).
"""

from __future__ import annotations

import contextlib
import math
from array import array
import time
import weakref
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .expect import Expectations
from .keys import Box, Key, covers

_ENUMERATE_LIMIT = 1 << 22
"""a source view whose strides do not line up with its tensor's dims is placed by listing its
elements, up to this many; larger ones count as the whole tensor"""


class Recorder:
    """Records what one rank's loaders wrote, against that rank's expectations.

    Example:
        >>> import torch
        >>> from distload.track import Expectations, Key, Recorder
        >>> param = torch.nn.Parameter(torch.zeros(2, 4), requires_grad=False)
        >>> exp = Expectations()
        >>> exp.expect(Key.of("w", dim=0, index=1, num_shards=2), param="w")
        >>> rec = Recorder(exp, {"w": param})
        >>> with rec.observe():
        ...     for name, tensor in rec.weights([("w", torch.ones(4, 4))]):
        ...         _ = param.data.copy_(tensor.narrow(0, 2, 2))   # rows 2-3: piece 1 of 2
        >>> [k.index for k in rec.loaded()]
        [1]
    """

    def __init__(self, expectations: Expectations, params: Mapping[str, torch.Tensor] | nn.Module, *,
                 enabled: bool = True) -> None:
        self.expectations = expectations
        self.enabled = enabled
        if isinstance(params, nn.Module):
            params = {**dict(params.named_parameters()), **dict(params.named_buffers())}
        self._params = dict(params)
        self._storages = {_storage(t): n for n, t in self._params.items() if _storage(t) is not None}
        self._yielded: dict[int, list] = {}  # storage -> [(name, tensor ref)]
        self._converted: dict[int, tuple] = {}  # storage of a cast / clone -> (its ref, what it was made from)
        self._current: str | None = None
        self._writes = array("i")  # per expected key (by position): complete writes seen
        self._partial: dict[int, list[Box]] = {}
        self.consumed: set[str] = set()
        """checkpoint tensors some write (or read, see ``note_read``) on this rank took bytes from"""
        self.foreign: set[str] = set()
        """the consumed tensors of which this rank expects no piece"""
        self.seen: set[str] = set()
        """checkpoint tensors the weights iterator yielded"""
        self.bytes_written = 0
        """bytes written into parameters from checkpoint tensors"""
        self.seconds = 0.0
        """wall time spent inside ``observe()``"""

    # ---------------------------------------------------------------- what the engine wraps

    def weights(self, iterator: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Wraps the engine's weights iterator: each tensor it yields becomes a known source."""
        for name, tensor in iterator:
            if self.enabled:
                self._register(name, tensor)
            yield name, tensor

    @contextlib.contextmanager
    def observe(self):
        """Observes every write into the rank's parameters while the block runs (wrap the engine's
        ``model.load_weights(...)`` call). A no-op when tracking is off."""
        if not self.enabled:
            yield self
            return
        start = time.perf_counter()
        before = {n: _storage(t) for n, t in self._params.items()}
        try:
            with _WriteWatch(self):
                yield self
        finally:
            self._replaced(before)
            self.seconds += time.perf_counter() - start

    def mark(self, key: Key) -> None:
        """Records a whole write of ``key``, for an engine that knows it filled that piece."""
        self._consume(key.name)
        at = self.expectations.position(key)
        if at is not None:
            self._bump(at)

    def _consume(self, name: str) -> None:
        if name not in self.consumed:
            self.consumed.add(name)
            if not self.expectations.positions_of(name):
                self.foreign.add(name)

    def note_read(self, name: str, shape: tuple[int, ...], box: Box | None) -> None:
        """Records that the bytes ``box`` of checkpoint tensor ``name`` of ``shape`` (None: all of
        it) arrived on this rank, for loaders observable only where they read (``read_slices``); a
        key counts as loaded when its box was covered, as for writes."""
        self._note(name, box, shape)

    def loaded(self) -> tuple[Key, ...]:
        """The expected keys this rank loaded as many times as it holds copies of them."""
        mask = self.loaded_mask().tolist()
        return tuple(e.key for e, ok in zip(self.expectations.entries(), mask) if ok)

    def loaded_mask(self) -> torch.Tensor:
        """Per expected key, in declaration order: whether this rank loaded all its copies."""
        _, _, copies = self.expectations.hashes()
        writes = torch.zeros(len(copies), dtype=torch.int32)
        if len(self._writes):
            done = torch.frombuffer(self._writes, dtype=torch.int32)[:len(copies)]
            writes[:len(done)] = done
        return writes >= copies

    def _bump(self, at: int) -> None:
        if at >= len(self._writes):
            self._writes.extend([0] * (at + 1 - len(self._writes)))
        self._writes[at] += 1

    # ---------------------------------------------------------------- attribution

    def _register(self, name: str, tensor: torch.Tensor) -> None:
        self.seen.add(name)
        self._current = name
        ptr = _storage(tensor)
        if ptr is None:
            return
        live = [(n, ref) for n, ref in self._yielded.get(ptr, ()) if ref() is not None]
        live.append((name, weakref.ref(tensor)))
        self._yielded[ptr] = live

    def _written(self, dest: torch.Tensor, sources: list[torch.Tensor]) -> None:
        """One operation wrote ``dest`` (a parameter's storage) from ``sources``."""
        self.bytes_written += dest.numel() * dest.element_size()
        found = False
        for src in sources:
            where = self._locate(src)
            if where is not None:
                self._note(*where)
                found = True
        if not found and self._current is not None and any(s.dim() > 0 for s in sources):
            # copied from something not traced to a checkpoint piece (computed from it): only its
            # checkpoint tensor is known, not which piece, so only keys of the whole tensor count
            self._note_whole(self._current)

    def _locate(self, src: torch.Tensor) -> tuple[str, Box | None, tuple[int, ...]] | None:
        """The checkpoint tensor ``src`` is a view of, ``src``'s box in it (None: no box) and its shape."""
        ptr = _storage(src)
        for name, ref in self._yielded.get(ptr, ()):
            base = ref()
            if base is not None and base.dtype == src.dtype and _inside(src, base):
                return name, _box_in(src, base), tuple(base.shape)
        made = self._converted.get(ptr)
        if made is not None:  # a whole cast or clone of a located piece is that piece
            ref, where = made
            whole = ref()
            if whole is not None and src.shape == whole.shape and src.storage_offset() == whole.storage_offset():
                return where
        return None

    def _conversion(self, out: torch.Tensor, src: torch.Tensor) -> None:
        """``out`` was made from ``src`` by a cast or a clone, element for element."""
        where = self._locate(src)
        ptr = _storage(out)
        if where is not None and ptr is not None:
            self._converted[ptr] = (weakref.ref(out), where)

    def _note(self, name: str, box: Box | None, shape: tuple[int, ...]) -> None:
        self._consume(name)
        for at in self.expectations.positions_of(name):
            if box is None:
                self._bump(at)
                continue
            target = self.expectations.entry(at).key.box(shape)
            if not _overlaps(target, box):
                continue
            boxes = self._partial.setdefault(at, [])
            boxes.append(box)
            if covers(target, boxes):
                self._bump(at)
                del self._partial[at]

    def _note_whole(self, name: str) -> None:
        self._consume(name)
        for at in self.expectations.positions_of(name):
            key = self.expectations.entry(at).key
            if key.region is None and (key.shard.dim is None or key.shard.num_shards == 1):
                self._bump(at)

    def _replaced(self, before: Mapping[str, int | None]) -> None:
        """A loader that replaced a parameter's data (``param.data = tensor``) wrote all of it."""
        for name, t in self._params.items():
            ptr = _storage(t)
            if ptr != before.get(name):
                self._storages.pop(before.get(name), None)
                if ptr is not None:
                    self._storages[ptr] = name
                where = self._locate(t.data)
                if where is not None:
                    self._note(*where)


class _WriteWatch(TorchDispatchMode):
    """Sees every operator call; reports those that mutate a parameter's storage."""

    _written_args: dict = {}
    """operator -> the positions and names of the arguments it writes (from its schema; most write none)"""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # loaders are not compiled; wrapping this in dynamo's disable would import dynamo (~3 s)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        written = self._written_args.get(func)
        if written is None:
            written = tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                            if a.alias_info is not None and a.alias_info.is_write)
            self._written_args[func] = written
        if not written and func in _CONVERSIONS and isinstance(out, torch.Tensor) and args \
                and isinstance(args[0], torch.Tensor) and out.shape == args[0].shape:
            self.recorder._conversion(out, args[0])
        if written:
            storages = self.recorder._storages
            for i, name in written:
                dest = args[i] if i < len(args) else kwargs.get(name)
                if isinstance(dest, torch.Tensor) and _storage(dest) in storages:
                    sources = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a is not dest]
                    self.recorder._written(dest, sources)
        return out


_CONVERSIONS = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.clone.default})
"""operators whose output is their input element for element (``.to``, ``.float()``, ``.clone()``,
``.contiguous()``): a copy from the output is a copy from the input's piece"""


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta tensors, tensor subclasses without storage
        return None


def _inside(src: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``src``'s elements lie in the storage span of ``base``."""
    if src.numel() == 0:
        return False
    lo = base.storage_offset()
    hi = lo + sum((n - 1) * s for n, s in zip(base.shape, base.stride())) + 1
    first = src.storage_offset()
    last = first + sum((n - 1) * s for n, s in zip(src.shape, src.stride()))
    return lo <= first and last < hi


def _box_in(src: torch.Tensor, base: torch.Tensor) -> Box | None:
    """``src``'s box in the coordinates of ``base`` (a view of it), or None when it is no box."""
    shape, strides = tuple(base.shape), tuple(base.stride())
    if not shape:
        return ()
    rel = src.storage_offset() - base.storage_offset()
    order = sorted(range(len(shape)), key=lambda d: -strides[d])
    start = [0] * len(shape)
    for d in order:  # peel the offset off, largest stride first
        if strides[d] > 0 and shape[d] > 1:
            start[d], rel = divmod(rel, strides[d])
    extent = [1] * len(shape)
    used: set[int] = set()
    fast = rel == 0
    for n, s in zip(src.shape, src.stride()):
        if n == 1:
            continue
        match = next((d for d in range(len(shape)) if strides[d] == s and shape[d] > 1 and d not in used), None)
        if match is None:
            fast = False
            break
        used.add(match)
        extent[match] = n
    box = tuple((a, a + e) for a, e in zip(start, extent))
    if fast and all(b <= n for (_, b), n in zip(box, shape)):
        return box
    return _box_by_listing(src, base)


def _box_by_listing(src: torch.Tensor, base: torch.Tensor) -> Box | None:
    """Lists ``src``'s elements as coordinates of ``base``: their bounding box when they fill it."""
    if src.numel() > _ENUMERATE_LIMIT or not base.is_contiguous():
        return None
    span = base.numel() + base.storage_offset()
    flat = torch.as_strided(torch.arange(span, dtype=torch.int64), src.shape, src.stride(),
                            src.storage_offset()).flatten() - base.storage_offset()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= base.numel()):
        return None
    coords = []
    for n in reversed(base.shape):
        coords.append(flat % n)
        flat = flat // n
    coords.reverse()
    box = tuple((int(c.min()), int(c.max()) + 1) for c in coords)
    volume = math.prod(b - a for a, b in box)
    return box if volume == src.numel() and torch.unique(torch.stack(coords), dim=1).shape[1] == volume else None


def _overlaps(a: Box, b: Box) -> bool:
    return all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b)) or not a
