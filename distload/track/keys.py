"""PURE: the key of one tracked piece of one checkpoint tensor, its box, and its two hashes.

A key is what distload's own unit table keys units by, ``(name, region, piece)``: a checkpoint
tensor name, the region of it a fused-on-disk parameter takes (or None), and which piece of that
tensor (or region) under a shard rule. Ranks that need the same bytes declare equal keys, and
equal keys hash equally on every rank, so the merge compares hashes instead of names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from ..errors import PlanError
from ..spec import Region, Shard

Box = tuple[tuple[int, int], ...]
"""``[start, stop)`` per dim of a checkpoint tensor"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """One piece of one checkpoint tensor that a rank expects to load (a load unit).

    Example:
        >>> Key.of("model.layers.0.self_attn.k_proj.weight", dim=0, index=1, num_shards=2).box((32, 64))
        ((16, 32), (0, 64))
        >>> Key.of("model.layers.0.mlp.experts.5.up_proj.weight").label
        'model.layers.0.mlp.experts.5.up_proj.weight'
    """

    name: str
    """checkpoint tensor name"""
    shard: Shard = Shard()
    """how the tensor (or its region) is cut into pieces"""
    index: int = 0
    """which piece"""
    region: Region | None = None
    """the box of the tensor a fused-on-disk parameter takes (Phi-3's ``qkv_proj`` rows of ``k``);
    None: the whole tensor"""

    @classmethod
    def of(cls, name: str, *, dim: int | None = None, index: int = 0, num_shards: int = 1, pad: bool = False,
           region: Region | None = None) -> "Key":
        """A key of piece ``index`` of ``num_shards`` along ``dim`` (None: the whole tensor or region)."""
        if dim is None and (num_shards != 1 or index != 0):
            raise PlanError(f"a whole-tensor key has one piece, got piece {index} of {num_shards}", tensor=name)
        if not 0 <= index < num_shards:
            raise PlanError(f"piece {index} is outside the {num_shards} pieces of the tensor", tensor=name)
        return cls(name=name, shard=Shard(dim=dim, num_shards=num_shards, pad=pad), index=index, region=region)

    @property
    def label(self) -> str:
        """The name, with the region's label when there is one (``qkv_proj.weight[k]``), as reports show it."""
        return f"{self.name}[{self.region.label}]" if self.region is not None else self.name

    def box(self, shape: Sequence[int]) -> Box:
        """The piece's ``[start, stop)`` along each dim of the checkpoint tensor of ``shape``
        (a 0-d tensor has the empty box)."""
        shape = tuple(shape)
        if not shape:
            return ()
        out = [(0, n) for n in shape]
        lead = 0
        region = self.region
        if region is not None:
            lead = len(region.at)
            for i, at in enumerate(region.at):
                out[i] = (at, at + 1)
            if region.dim is not None:
                out[lead + region.dim] = (region.start, region.stop)
        dim = self.shard.dim
        if dim is not None:
            lo, hi = out[lead + dim]
            start, stop = self.shard.span(size=hi - lo, index=self.index)
            out[lead + dim] = (lo + start, lo + stop)
        return tuple(out)

    def canonical(self) -> bytes:
        """The bytes both hashes are taken of: equal for equal keys on every rank and machine."""
        r = self.region
        region = "" if r is None else f"{list(r.tensor_shape)}|{list(r.at)}|{r.dim}|{r.start}|{r.stop}|{r.label}"
        s = self.shard
        return f"{self.name}\0{region}\0{s.dim}\0{s.num_shards}\0{int(s.pad)}\0{self.index}".encode()


OPTIONAL_BIT = 1
"""the low bit of a key's second hash carries its role (1: optional), so the role travels with
the key at no cost"""

LOADED_BIT = 2
"""the next bit is left clear for the merge, which sets it in a rank's row for a key that rank
loaded; collisions are judged on the other 30 bits"""


def key_hash(key: Key) -> tuple[int, int]:
    """The key's 64-bit hash (the merge's unit key) and an independent 32-bit one (catches two
    different keys that share the first), as signed integers.

    Both come from one 96-bit BLAKE2b digest of ``Key.canonical``: its first 8 bytes and its last 4,
    independent bits of a cryptographic hash. The second's two low bits are cleared: they carry the
    role (``OPTIONAL_BIT``) and, in the merge, whether the key was loaded (``LOADED_BIT``).

    Example:
        >>> key_hash(Key.of("w")) == key_hash(Key.of("w")) != key_hash(Key.of("w", dim=0, num_shards=2))
        True
    """
    digest = hashlib.blake2b(key.canonical(), digest_size=12).digest()
    return (int.from_bytes(digest[:8], "little", signed=True),
            int.from_bytes(digest[8:], "little", signed=True) & ~(OPTIONAL_BIT | LOADED_BIT))


def covers(target: Box, boxes: Sequence[Box]) -> bool:
    """Whether the union of ``boxes`` holds every element of ``target``.

    Example:
        >>> covers(((0, 4), (0, 8)), [((0, 2), (0, 8)), ((2, 4), (0, 8))])
        True
        >>> covers(((0, 4), (0, 8)), [((0, 4), (0, 7))])
        False
    """
    if any(all(lo <= t0 and t1 <= hi for (lo, hi), (t0, t1) in zip(b, target)) for b in boxes):
        return True  # the common case: one write holds the whole piece
    clipped = [tuple((max(lo, t0), min(hi, t1)) for (lo, hi), (t0, t1) in zip(b, target)) for b in boxes]
    clipped = [b for b in clipped if all(lo < hi for lo, hi in b)]
    if not clipped:
        return not target or any(t0 >= t1 for t0, t1 in target)
    # coordinate compression: every cell between consecutive box edges is in a box or not
    edges = [sorted({t0, t1, *(c for b in clipped for c in b[d])}) for d, (t0, t1) in enumerate(target)]
    cells = [list(zip(e, e[1:])) for e in edges]
    return all(any(all(b[d][0] <= cell[d][0] and cell[d][1] <= b[d][1] for d in range(len(target)))
                   for b in clipped)
               for cell in _product(cells))


def _product(axes):
    if not axes:
        yield ()
        return
    for head in axes[0]:
        for rest in _product(axes[1:]):
            yield (head, *rest)
