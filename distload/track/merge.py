"""Merging every rank's expectations and record into one ``LoadReport``, the same on every rank.

No rank can derive another's expectations, so the unit table is made by the merge itself, from
fixed-size collectives (names travel only for what failed):

1. *agree*: an all-gather of a few integers per rank (key count, loaded count, flags, the
   checkpoint's fingerprint); ranks that disagree on the checkpoint are refused, as in ``load``.
2. *keys*: an all-gather of each rank's sorted 64-bit key hashes, padded to the largest count,
   with their independent 32-bit second hashes packed behind; a second hash's two low bits say
   whether the key is optional and whether the rank loaded it. The union of the hashes is the
   unit table; a rank owns the units its row holds; a unit whose second hashes differ is a
   collision.
3. *units*: every rank holds every row, so the table is judged in parts: rank ``r`` of ``W``
   sorts and classifies the units whose hashes fall in the ``r``-th of ``W`` equal hash ranges
   (hashes are uniform, so the parts are even), then a small all-gather shares each part's
   unit count and the numbers of its failed, defaulted and colliding units, and (only when
   some part found any) a second one their hashes. Each rank sorts a ``W``-th of the table,
   not all of it.
4. *names*: one sum all-reduce of whether each rank expected or consumed each checkpoint
   tensor (for *unexpected*).

Only when some unit failed or was defaulted: the lowest owner of each sends its key (the names),
then every rank its facts about each failed name, then (when some rank declared derived
parameters) the derived parameters those names affect. Classification is ``tracking``'s, the one
``load`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .. import tracking
from .._version import __version__
from ..checkpoint.directory import Checkpoint, open_checkpoint
from ..comm import Comm, GroupComm, WorldInfo
from ..config import weights_track
from ..errors import ConfigError, DistloadError
from ..fingerprint import PARTS, checkpoint_digests, disagreement, fingerprint, from_words, to_words
from ..layout import Layout
from ..plan import split_leftover
from ..report import LoadReport, RankStats
from ..tracking import Entry, Findings, NameFacts
from .expect import Expectations
from .keys import LOADED_BIT, OPTIONAL_BIT, Key
from .record import Recorder

_AGREE = 6
"""leading integers of the agreement row: keys, loaded keys, has derived, problem, bytes, microseconds"""


def enabled(extra_config: Mapping | None = None) -> bool:
    """Whether tracking is on for an engine's loader extra-config: ``enable_weights_track`` true,
    false or unset (= on), validated as ``LoadConfig`` validates it. The dict is the engine's, so
    its other keys (vLLM's ``num_threads``, ...) are its own business.

    Raises:
        ConfigError: ``enable_weights_track`` is neither a bool nor unset.

    Example:
        >>> enabled({"enable_weights_track": False}), enabled({"num_threads": 8})
        (False, True)
    """
    return weights_track(dict(extra_config or {}))


def merge(expectations: Expectations, recorder: Recorder, *, checkpoint: str | Checkpoint, group=None,
          world: WorldInfo | None = None, layout: Layout | None = None, extra_config: Mapping | None = None,
          ignore: Iterable[str] = (), strict: bool = False) -> LoadReport:
    """Merges every rank's expectations and record; call it on every rank of the group.

    Args:
        expectations: this rank's expected keys (``Expectations`` or ``from_engine``).
        recorder: what this rank's loaders wrote.
        checkpoint: the checkpoint directory (its headers are the universe of tensors and what
            the ranks must agree on), or a ``Checkpoint`` already opened.
        group: the engine's process group; None: the world (or one rank without torch.distributed).
        world: this rank's place (``distload.WorldInfo``, e.g. from ``distload.ray.rendezvous``),
            for ranks without a process group (a serving engine's Ray actors): the group is formed
            as ``distload.load(world=...)`` forms it (gloo here; an existing default group of that
            rank and size is used instead) and destroyed after the merge if the merge made it.
        layout: the engine's layout, for the report and the fingerprint (its world must be the
            group's size); default: every rank its own replica.
        extra_config: the loader extra-config; ``enable_weights_track: false`` merges nothing.
        ignore: regexes of checkpoint names never reported unexpected (besides DEFAULT_IGNORE).
        strict: unexpected tensors make ``report.ok`` false.

    Returns:
        The same ``LoadReport`` (mode ``track``) on every rank; ``report.ok`` tells whether the
        load may be used.

    Raises:
        DistloadError: ranks disagree on the checkpoint, or two different keys share a hash.
        ConfigError: both ``group`` and ``world`` were given, or an existing process group does
            not have ``world``'s rank and size.
    """
    options = dict(checkpoint=checkpoint, layout=layout, extra_config=extra_config, ignore=tuple(ignore),
                   strict=strict)
    if world is None:
        return merge_with(GroupComm(group), expectations, recorder, **options)
    if group is not None:
        raise ConfigError("track.merge takes group= (an engine's process group) or world= (a group to form), "
                          "not both")
    # the merge's collectives are small gathers: gloo, as on an engine's CPU group, whatever the model's device
    formed = Comm.connect(world, device=torch.device("cpu"))
    try:
        return merge_with(GroupComm(), expectations, recorder, **options)
    finally:
        formed.close()


def merge_with(comm, expectations: Expectations, recorder: Recorder, *, checkpoint: str | Checkpoint,
               layout: Layout | None = None, extra_config: Mapping | None = None, ignore: tuple[str, ...] = (),
               strict: bool = False) -> LoadReport:
    """``merge`` over ``comm`` (anything with ``rank``, ``size``, ``ranks``, ``gather_rows``, ``sum``
    and ``gather_objects``: the group's collectives, or a simulation of them)."""
    layout = layout or Layout.for_world(comm.size)
    if layout.world_size != comm.size:
        raise DistloadError(f"layout {layout.describe()} does not fit the group of {comm.size} ranks", rank=comm.ranks[comm.rank])
    if not enabled(extra_config):
        directory = checkpoint.directory if isinstance(checkpoint, Checkpoint) else checkpoint
        return LoadReport(mode="track", checkpoint=directory, layout=layout.to_dict(), strict=strict, tracked=False,
                          num_units=len(expectations), findings=None)
    mine = _Local.of(expectations, recorder)
    fp, fault = None, mine.problem
    try:  # a rank that cannot read the checkpoint says so in the agreement: every rank stops alike
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
        universe = _Universe.of(ckpt)
        fp = fingerprint(ckpt, layout, (), __version__, {"ignore": list(ignore), "strict": strict},
                         checkpoint=universe.digests)
    except DistloadError as err:
        fault = fault or str(err)
    agreed = _agree(comm, mine, fp, fault)
    base = dict(mode="track", checkpoint=ckpt.directory, layout=layout.to_dict(), strict=strict)
    table = _Table.of(comm.gather_rows(mine.row(int(agreed[:, 0].max()))), agreed[:, 0].tolist())
    verdict = table.part(comm.rank).shared(comm)
    if len(verdict.collided):
        _refuse_collisions(comm, mine, verdict.collided)
    findings = Findings(missing=(), inconsistent=(), defaulted=(), mismatched=())
    if len(verdict.failed) or len(verdict.defaulted):
        findings = _name_failures(comm, mine, table, verdict, has_derived=bool(agreed[:, 2].any()))
    totals = comm.sum(mine.name_flags(universe, tracking.count_dtype(comm.size)))
    unused = torch.nonzero(totals == 0).flatten().tolist()
    ignored, unexpected, _ = split_leftover((universe.names[i] for i in unused), ignore)
    ranks = tuple(RankStats(rank=comm.ranks[r], units_loaded=a[1], units_owned=a[0], units_not_loaded=a[0] - a[1],
                            bytes_read=a[4], seconds=a[5] / 1e6, files_opened=0)
                  for r, a in enumerate(agreed.tolist()))
    return LoadReport(tracked=True, num_units=verdict.units, findings=findings, unexpected=unexpected,
                      ignored=ignored, ranks=ranks, seconds=ranks[0].seconds, **base)


@dataclass(frozen=True, slots=True)
class _Universe:
    """A checkpoint's tensor names (sorted) and digests: worked out once per opened checkpoint."""

    names: list[str]
    index: dict[str, int]
    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, ckpt: Checkpoint) -> "_Universe":
        held = _UNIVERSES.get(id(ckpt))
        if held is not None and held[0] is ckpt:
            return held[1]
        names = sorted(ckpt.tensors)
        made = cls(names=names, index={n: i for i, n in enumerate(names)}, digests=checkpoint_digests(ckpt))
        if len(_UNIVERSES) >= 4:
            _UNIVERSES.pop(next(iter(_UNIVERSES)))
        _UNIVERSES[id(ckpt)] = (ckpt, made)
        return made


_UNIVERSES: dict[int, tuple[Checkpoint, _Universe]] = {}
"""the last few checkpoints merged over (an engine merges once per load, a benchmark many times)"""


@dataclass(frozen=True, slots=True)
class _Local:
    """One rank's keys sorted by hash, with what it loaded of them."""

    order: torch.Tensor
    """declaration positions in hash order"""
    hashes: torch.Tensor
    """int64, sorted"""
    second: torch.Tensor
    """int32, the role in the low bit"""
    loaded: torch.Tensor
    """bool per key: written as many times as the rank holds copies"""
    expectations: Expectations
    recorder: Recorder
    problem: str = ""
    """a fault of this rank's keys that must stop every rank (two keys sharing a hash)"""

    @classmethod
    def of(cls, expectations: Expectations, recorder: Recorder) -> "_Local":
        first, second, _ = expectations.hashes()
        first, order = torch.sort(first, stable=True)
        problem = ""
        same = torch.nonzero(first[1:] == first[:-1]).flatten().tolist()
        if same:
            a, b = (expectations.entry(int(order[i])).key.label for i in (same[0], same[0] + 1))
            problem = f"keys {a} and {b} share a 64-bit hash; rename one of them"
        return cls(order=order, hashes=first, second=second[order], loaded=recorder.loaded_mask()[order],
                   expectations=expectations, recorder=recorder, problem=problem)

    def key(self, i: int) -> Key:
        """The ``i``-th key in hash order."""
        return self.expectations.entry(int(self.order[i])).key

    def row(self, width: int) -> torch.Tensor:
        """``width`` hashes (padded), then the second hashes, with ``LOADED_BIT`` set on the keys
        this rank loaded, packed two per int64."""
        n, half = len(self.hashes), (width + 1) // 2
        second = torch.zeros(2 * half, dtype=torch.int32)
        second[:n] = self.second | self.loaded.to(torch.int32) * LOADED_BIT
        first = torch.zeros(width, dtype=torch.int64)
        first[:n] = self.hashes
        return torch.cat([first, second.view(torch.int64)])

    def name_flags(self, universe: "_Universe", dtype: torch.dtype) -> torch.Tensor:
        """1 per checkpoint tensor this rank expected or consumed."""
        out = torch.zeros(len(universe.names), dtype=dtype)
        index = universe.index
        out[self.expectations.name_positions(index)] = 1
        out[[index[n] for n in self.recorder.foreign if n in index]] = 1
        return out


@dataclass(frozen=True, slots=True)
class _Table:
    """Every rank's sorted key hashes and second hashes, as all-gathered."""

    rows: tuple[torch.Tensor, ...]
    """each rank's sorted hashes (its valid prefix)"""
    seconds: tuple[torch.Tensor, ...]
    """each rank's second hashes, with its role and loaded bits, in the order of ``rows``"""

    @property
    def size(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, gathered: torch.Tensor, counts: list[int]) -> "_Table":
        """Splits the all-gathered rows (``_Local.row``) into each rank's valid prefix."""
        width = (gathered.shape[1] * 2) // 3
        second = gathered[:, width:].contiguous().view(torch.int32)
        return cls(rows=tuple(gathered[r, :c] for r, c in enumerate(counts)),
                   seconds=tuple(second[r, :c] for r, c in enumerate(counts)))

    def part(self, index: int) -> "_Judgement":
        """The units whose hashes fall in the ``index``-th of ``size`` equal ranges of int64."""
        span = 2**64 // self.size
        lo = -2**63 + index * span
        hi = -2**63 + (index + 1) * span if index + 1 < self.size else None
        hashes, bits = [], []
        for row, second in zip(self.rows, self.seconds):
            a = int(torch.searchsorted(row, torch.tensor(lo, dtype=torch.int64)))
            b = len(row) if hi is None else int(torch.searchsorted(row, torch.tensor(hi, dtype=torch.int64)))
            hashes.append(row[a:b])
            bits.append(second[a:b])
        return _Judgement.of(torch.cat(hashes), torch.cat(bits))

    def owner_matrix(self, wanted: torch.Tensor) -> torch.Tensor:
        """``[ranks, len(wanted)]`` bool: whether each rank owns each of the hashes ``wanted``."""
        out = torch.zeros((self.size, len(wanted)), dtype=torch.bool)
        for r, row in enumerate(self.rows):
            at = torch.searchsorted(row, wanted)
            ok = at < len(row)
            out[r, ok] = row[at[ok]] == wanted[ok]
        return out


@dataclass(frozen=True, slots=True)
class _Judgement:
    """What was found in one hash range of the unit table, or (``shared``) in all of them."""

    units: int
    failed: torch.Tensor
    """hashes (sorted) of the units some owner did not load"""
    defaulted: torch.Tensor
    """hashes of the optional units no owner loaded"""
    collided: torch.Tensor
    """hashes of the units whose owners' second hashes differ"""

    @classmethod
    def of(cls, every: torch.Tensor, bits: torch.Tensor) -> "_Judgement":
        """Judges the keys ``every`` (all ranks' in this range, with their second hashes ``bits``)."""
        ordered, perm = torch.sort(every)
        first = torch.ones(len(ordered), dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        unit = torch.cumsum(first, 0) - 1  # each sorted key's unit
        hashes = ordered[first]
        bits = bits[perm]
        owners = torch.zeros(len(hashes), dtype=torch.int32).index_add_(0, unit, torch.ones_like(bits))
        loaded = torch.zeros(len(hashes), dtype=torch.int32).index_add_(0, unit, (bits & LOADED_BIT) // LOADED_BIT)
        optional = torch.zeros(len(hashes), dtype=torch.int32).index_add_(0, unit, bits & OPTIONAL_BIT) == owners
        high = bits >> 2
        clash = ~first[1:] & (high[1:] != high[:-1])
        failed, defaulted = tracking.unit_outcomes(loaded, owners, lambda u: bool(optional[u]))
        return cls(units=len(hashes), failed=hashes[torch.tensor(failed, dtype=torch.int64)],
                   defaulted=hashes[torch.tensor(defaulted, dtype=torch.int64)],
                   collided=torch.unique(hashes[unit[1:][clash]]))

    def shared(self, comm) -> "_Judgement":
        """Every part's judgement, the same on every rank (each list sorted: the parts are in
        order): the sizes in one all-gather, then, only when some part found something, the
        hashes in a second, padded to the longest."""
        lists = (self.failed, self.defaulted, self.collided)
        sizes = comm.gather_rows(torch.tensor([self.units, *map(len, lists)], dtype=torch.int64))
        units = int(sizes[:, 0].sum())
        longest = int(sizes[:, 1:].sum(1).max())
        if not longest:
            empty = torch.zeros(0, dtype=torch.int64)
            return _Judgement(units=units, failed=empty, defaulted=empty, collided=empty)
        row = torch.zeros(longest, dtype=torch.int64)
        mine = torch.cat(lists)
        row[:len(mine)] = mine
        out: tuple[list, list, list] = ([], [], [])
        for got, n in zip(comm.gather_rows(row), sizes[:, 1:].tolist()):
            cuts = [0, *torch.cumsum(torch.tensor(n), 0).tolist()]
            for j in range(3):
                out[j].append(got[cuts[j]:cuts[j + 1]])
        return _Judgement(units=units, failed=torch.cat(out[0]), defaulted=torch.cat(out[1]),
                          collided=torch.cat(out[2]))


def _agree(comm, mine: _Local, fp, fault: str) -> torch.Tensor:
    """The agreement step; returns every rank's leading integers ``[ranks, _AGREE]``.

    Raises (on every rank): the first rank's fault (a checkpoint it could not read, two of its keys
    sharing a hash), else the ranks whose fingerprint differs from rank 0's.
    """
    rec = mine.recorder
    head = [len(mine.hashes), int(mine.loaded.sum()), int(bool(mine.expectations.derived)), int(bool(fault)),
            rec.bytes_written, int(rec.seconds * 1e6)]
    words = to_words(fp) if fp is not None else [0] * (len(PARTS) * 2)
    rows = comm.gather_rows(torch.tensor(head + words, dtype=torch.int64))
    if bool(rows[:, 3].any()):
        texts = comm.gather_objects(fault)
        first = next(r for r, t in enumerate(texts) if t)
        raise DistloadError(f"rank {comm.ranks[first]}: {texts[first]}", rank=comm.ranks[comm.rank])
    err = disagreement([from_words(r[_AGREE:].tolist()) for r in rows], rank=comm.rank, before="merging")
    if err is not None:
        raise err
    return rows[:, :_AGREE]


def _refuse_collisions(comm, mine: _Local, collided: torch.Tensor) -> None:
    """Two different keys on different ranks share a 64-bit hash: every rank names them and stops."""
    wanted = set(collided.tolist())
    labels = comm.gather_objects(sorted({mine.key(i).label for i, h in enumerate(mine.hashes.tolist()) if h in wanted}))
    names = sorted({n for part in labels for n in part})
    raise DistloadError(f"different keys share a 64-bit hash across ranks: {', '.join(names)}; rename one of them",
                        rank=comm.ranks[comm.rank])


def _name_failures(comm, mine: _Local, table: _Table, verdict: _Judgement, *, has_derived: bool) -> Findings:
    """The exchanges that name what failed, and the shared classification of it."""
    chosen = torch.cat([verdict.failed, verdict.defaulted])
    failed = range(len(verdict.failed))
    defaulted = range(len(verdict.failed), len(chosen))
    owns = table.owner_matrix(chosen)
    lowest = owns.to(torch.int8).argmax(dim=0).tolist()
    at = torch.searchsorted(mine.hashes, chosen).tolist()
    labels = {u: mine.key(at[u]) for u in range(len(chosen)) if lowest[u] == comm.rank}
    keys: dict[int, Key] = {}
    for part in comm.gather_objects(labels):
        keys.update(part)
    names = sorted({keys[u].name for u in failed})
    done = mine.recorder.loaded_mask().tolist()  # by declaration position
    facts = []
    for name in names:  # per failed name: owns a piece of it, loaded all of them, loaded any
        own = [done[p] for p in mine.expectations.positions_of(name)]
        facts += [bool(own), all(own), any(own)]
    rows = comm.gather_rows(torch.tensor(facts, dtype=torch.int8)).bool()
    affects: dict[str, list[str]] = {}
    if has_derived:
        shown = {*names, *(keys[u].name for u in defaulted)}
        local = {n: [p for p, src in mine.expectations.derived.items() if n in src] for n in shown}
        for part in comm.gather_objects(local):
            for n, params in part.items():
                known = affects.setdefault(n, [])
                known.extend(p for p in dict.fromkeys(params) if p not in known)
    ranks = comm.ranks

    def who(mask: torch.Tensor) -> tuple[int, ...]:
        return tuple(ranks[r] for r in torch.nonzero(mask).flatten().tolist())

    missing, inconsistent = tracking.failure_entries(
        NameFacts(name=n, owners=who(rows[:, 3 * i]), loaded_by=who(rows[:, 3 * i] & rows[:, 3 * i + 1]),
                  anything=bool(rows[:, 3 * i + 2].any()), affects=tuple(affects.get(n, ())))
        for i, n in enumerate(names))
    by_name: dict[str, set[int]] = {}
    for u in defaulted:
        by_name.setdefault(keys[u].name, set()).update(who(owns[:, u]))
    defaults = tuple(Entry(name=n, owners=tuple(sorted(rs)), affects=tuple(affects.get(n, ())))
                     for n, rs in sorted(by_name.items()))
    return Findings(missing=missing, inconsistent=inconsistent, defaulted=defaults, mismatched=())
