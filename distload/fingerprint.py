"""What every rank must agree on before reading tensor data, as comparable digests.

Paths are left out on purpose: ranks may mount one checkpoint at different places.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from .checkpoint.directory import Checkpoint
from .errors import DistloadError
from .layout import Layout
from .spec import ParamSpec

PARTS = ("distload version", "checkpoint config", "checkpoint index", "checkpoint file sizes",
         "checkpoint headers", "layout", "model specs", "load options")
"""the components compared, in a fixed order"""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """One 16-byte digest per entry of PARTS."""

    digests: tuple[bytes, ...]

    def differing(self, other: "Fingerprint") -> tuple[str, ...]:
        """Names the parts in which two fingerprints differ."""
        return tuple(name for name, a, b in zip(PARTS, self.digests, other.digests) if a != b)


def fingerprint(ckpt: Checkpoint, layout: Layout, specs: Iterable[ParamSpec], version: str,
                options: dict, *, checkpoint: tuple[bytes, ...] | None = None) -> Fingerprint:
    """Digests what must be equal on every rank (file sizes as their headers were read, no data).

    ``checkpoint``: ``checkpoint_digests(ckpt)`` computed before (they depend on the checkpoint only).
    """
    spec_rows = [(s.name, s.stage, s.shape, s.role.value, s.default, s.derived_from,
                  [(src.name, src.shape, src.shard.dim, src.shard.num_shards, src.shard.pad, src.shard.block,
                    src.offset, src.region) for src in (*s.sources, *s.verify)],
                  None if s.experts is None else (s.experts.placement.slots, s.experts.placement.kind,
                                                  [(p.name, p.shape, p.shard, p.offset, p.region)
                                                   for p in s.experts.parts]))
                 for s in specs]
    return Fingerprint((_digest(version), *(checkpoint or checkpoint_digests(ckpt)), _digest(layout.to_dict()),
                        _digest(spec_rows), _digest(options)))


def checkpoint_digests(ckpt: Checkpoint) -> tuple[bytes, ...]:
    """The digests of the checkpoint's config, index, file sizes and headers (PARTS 1-4)."""
    base = {f: os.path.basename(f) for f in {t.file for t in ckpt.tensors.values()} | set(ckpt.files)}
    files = {base[f]: ckpt.sizes[f] for f in ckpt.files}
    rows = sorted((t.name, base[t.file], str(t.dtype), t.shape, t.end - t.begin) for t in ckpt.tensors.values())
    index = [(name, file) for name, file, *_ in rows]
    return (_digest(dict(ckpt.config)), _digest(index), _digest(files), _digest(rows))


def _digest(value: object) -> bytes:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def disagreement(prints: Sequence[Fingerprint], *, rank: int, before: str = "loading") -> DistloadError | None:
    """The error every rank raises when some rank's fingerprint differs from rank 0's (None: all agree).

    It names the differing ranks (positions in ``prints``) and the parts they differ in.
    """
    odd = {r: prints[0].differing(p) for r, p in enumerate(prints) if p != prints[0]}
    if not odd:
        return None
    parts = sorted({part for diff in odd.values() for part in diff})
    return DistloadError(f"ranks {sorted(odd)} disagree with rank 0 before {before}, in: {', '.join(parts)} "
                         "(different checkpoints, layouts, model specs or distload versions)", rank=rank)


def to_words(fp: Fingerprint) -> list[int]:
    """The digests as signed 64-bit integers (to travel in an int64 tensor)."""
    raw = b"".join(fp.digests)
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def from_words(words: Sequence[int]) -> Fingerprint:
    """The inverse of ``to_words``."""
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words)
    return Fingerprint(tuple(raw[i:i + 16] for i in range(0, len(raw), 16)))
