"""PURE planning: (checkpoint headers, parameter specs, layout) -> unit table and per-rank reads.

Nothing here touches torch.distributed, devices or tensor data, so a plan for
thousands of simulated ranks runs in a unit test. The unit table itself is built
in ``units``; this module turns it into each rank's reads (or, for dry runs,
their totals).
"""

from __future__ import annotations

import dataclasses
import math
import re
from array import array
from dataclasses import dataclass
from typing import Iterable, Mapping

from .checkpoint.header import TensorInfo
from .layout import Layout
from .spec import ParamSpec, Role, Source
from .units import Unit, UnitKey, add_expert_units, add_units, check_regions, check_tiling, owner_counts

__all__ = ["DEFAULT_IGNORE", "Plan", "RankPlan", "RankSummary", "Read", "Unit", "check_tiling", "plan",
           "split_leftover"]

DEFAULT_IGNORE = (r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$",)
"""checkpoint names never reported unexpected: rotary tables that old checkpoints
saved but every model recomputes"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Read:
    """Bytes one rank reads for one unit, and where they go in its parameter.

    The bytes are ``count`` runs of ``run`` bytes, ``stride`` apart, from ``offset``:
    one run for a dim-0 shard, one per row for a dim-1 shard (only the rank's columns).
    """

    unit: int
    """index in the unit table"""
    param: str
    """parameter to fill"""
    tensor: TensorInfo
    """the checkpoint tensor"""
    offset: int
    """absolute file offset of the first run"""
    run: int
    """bytes per run"""
    stride: int
    """bytes between starts of consecutive runs"""
    count: int
    """number of runs"""
    shape: tuple[int, ...]
    """shape of the piece read"""
    dim: int | None
    """parameter dim the piece is placed along; None: the piece is the whole parameter"""
    dest: tuple[int, int]
    """``[start, stop)`` in the parameter along ``dim``"""
    slot: int | None = None
    """local expert slot (index along the parameter's dim 0) the piece goes into, first"""
    verify: bool = False
    """compare with the parameter instead of writing it"""

    @property
    def nbytes(self) -> int:
        return self.run * self.count


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPlan:
    """What one rank does: its reads, and the parameters it fills without reading."""

    rank: int
    """global rank"""
    reads: tuple[Read, ...]
    """byte-range reads, one per unit present in the checkpoint"""
    defaults: tuple[tuple[str, float], ...]
    """optional parameters filled with their default before any read"""
    zero: tuple[str, ...]
    """parameters with padding rows, zeroed before any read"""
    owned: tuple[int, ...]
    """every unit this rank owns, present in the checkpoint or not"""

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def files(self) -> frozenset[str]:
        return frozenset(r.tensor.file for r in self.reads)


@dataclass(frozen=True, kw_only=True, slots=True)
class RankSummary:
    """What one rank's plan amounts to (a dry run's per-rank numbers)."""

    units_present: int
    """distinct owned units present in the checkpoint (what a sound load fills)"""
    units_owned: int
    """distinct units the rank owns"""
    nbytes: int
    """bytes its reads request"""
    files: int
    """files its reads touch"""


@dataclass(frozen=True, slots=True)
class Plan:
    """The canonical unit table and the data to derive any rank's ``RankPlan``."""

    layout: Layout
    specs: tuple[ParamSpec, ...]
    units: tuple[Unit, ...]
    """canonical unit table: the same on every rank, in spec order"""
    unit_ids: Mapping[UnitKey, int]
    """(checkpoint name, region or None, piece index) -> unit index"""
    tensors: Mapping[str, TensorInfo]
    unexpected: tuple[str, ...]
    """checkpoint tensors no unit consumes and no ignore rule names"""
    ignored: tuple[str, ...]
    """checkpoint tensors skipped by an ignore rule"""
    owner_counts: array
    """number of owners of each unit, in table order (C ints; read-only): what a complete
    load's summed records equal, kept as one buffer so tracking compares without a loop"""
    verify_units: tuple[int, ...]
    """indices of the units read only to be compared (their mismatch flags trail each record)"""
    ignore_rules: tuple[str, ...] = ()
    """for each of ``ignored``, the ignore rule (regex) that ignored it"""
    _dense: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """cache: (tp index, stage) -> the part of a rank plan that does not depend on expert
    groups; ("pieces", expert parameter, expert shard) -> per part, every expert's unit and tensor"""

    def owners(self, unit: int) -> tuple[int, ...]:
        """Returns the ranks that own ``unit``, in rank order."""
        u = self.units[unit]
        if u.placement is not None:  # every shard-holder of every group hosting a copy of the expert
            lay = self.layout
            width = lay.expert_tp // u.num_shards
            return tuple(sorted(r for pp in u.stages for g in set(u.placement.groups_of(u.expert))
                                for k in range(u.index * width, (u.index + 1) * width)
                                for r in lay.expert_ranks(group=g, shard=k, pp=pp)))
        width = self.layout.tp // u.num_shards
        lo = u.index * width
        per_stage = self.layout.tp * self.layout.dp
        # TP groups come in rank order and hold their ranks in TP order
        return tuple(group[t] for group in self.layout.tp_groups() if group[0] // per_stage in u.stages
                     for t in range(lo, lo + width))

    def num_owners(self, unit: int) -> int:
        """Returns ``len(owners(unit))`` without listing them."""
        return self.owner_counts[unit]

    def rank_class(self, rank: int) -> tuple:
        """Returns what ``for_rank(rank)`` depends on: ranks with equal classes read the same
        bytes (today the TP index; the same piece in every replica)."""
        c = self.layout.coords(rank)
        return (c.tp, c.pp, *self.layout.expert_coords(rank))

    def for_rank(self, rank: int) -> RankPlan:
        """Returns the reads and fills of ``rank``."""
        coords = self.layout.coords(rank)
        reads, defaults, zero, owned = (list(part) for part in self._dense_for(coords.tp, coords.pp))
        group, shard_i = self.layout.expert_coords(rank)
        for spec in self._expert_specs(coords.pp):
            if any(p.shard.pad and _is_short(p, shard_i, self.layout.expert_tp) for p in spec.experts.parts):
                zero.append(spec.name)  # whole blocks split unevenly: this shard ends in padding
            for slot, part, unit, info in self._hosted_units(spec, group, shard_i):
                owned.append(unit)
                if info is not None:
                    reads.append(_read(unit, self.units[unit], part.offset, info, spec, slot=slot))
        return RankPlan(rank=rank, reads=tuple(reads), defaults=tuple(defaults), zero=tuple(zero),
                        owned=tuple(owned))

    def summary(self, rank: int) -> RankSummary:
        """Returns what ``for_rank(rank)`` amounts to (units, bytes, files) without building its
        reads: a dry run of thousands of ranks with a million expert units needs only this."""
        coords = self.layout.coords(rank)
        key = ("summary", coords.tp, coords.pp)
        if key not in self._dense:
            reads, _, _, owned = self._dense_for(coords.tp, coords.pp)
            self._dense[key] = (frozenset(r.unit for r in reads), frozenset(owned), sum(r.nbytes for r in reads),
                                frozenset(r.tensor.file for r in reads))
        dense_present, dense_owned, nbytes, dense_files = self._dense[key]
        present, owned, files = set(dense_present), set(dense_owned), set(dense_files)
        group, shard_i = self.layout.expert_coords(rank)
        for spec in self._expert_specs(coords.pp):
            for _, _, unit, info in self._hosted_units(spec, group, shard_i):
                owned.add(unit)
                if info is not None and unit not in present:
                    present.add(unit)
                    nbytes += piece_nbytes(self.units[unit], info)
                    files.add(info.file)
        return RankSummary(units_present=len(present), units_owned=len(owned), nbytes=nbytes,
                           files=len(files))

    def _dense_part(self, tp_i: int, stage: int) -> tuple[tuple, tuple, tuple, tuple]:
        reads: list[Read] = []
        defaults: list[tuple[str, float]] = []
        zero: list[str] = []
        owned: list[int] = []
        for spec in self.specs:
            if spec.stage != stage:
                continue
            if spec.role is Role.OPTIONAL:
                defaults.append((spec.name, float(spec.default)))  # type: ignore[arg-type]
            padded = False
            for src in spec.sources:
                unit = self._own(src, tp_i, spec, owned)
                padded |= src.shard.pad and _is_short(src, tp_i, self.layout.tp)
                if unit is not None and src.name in self.tensors:
                    reads.append(_read(unit, self.units[unit], src.offset, self.tensors[src.name], spec))
            for src in spec.verify:
                if src.name in self.tensors:
                    unit = self._own(src, tp_i, spec, owned)
                    if unit is not None:
                        reads.append(_read(unit, self.units[unit], src.offset, self.tensors[src.name], spec))
            if padded:
                zero.append(spec.name)
        return tuple(reads), tuple(defaults), tuple(zero), tuple(owned)

    def _dense_for(self, tp_i: int, stage: int) -> tuple[tuple, tuple, tuple, tuple]:
        """The part of a rank plan that every replica and expert group of (TP index, stage) shares."""
        if (tp_i, stage) not in self._dense:
            self._dense[(tp_i, stage)] = self._dense_part(tp_i, stage)
        return self._dense[(tp_i, stage)]

    def _hosted_units(self, spec: ParamSpec, group: int, shard_i: int):
        """Yields ``(slot, part, unit, tensor info or None)`` for the experts ``group`` hosts, slot
        by slot: this expert shard's units, and no other expert's."""
        key = ("pieces", spec.name, shard_i)  # the same for every expert group
        if key not in self._dense:
            experts, etp = spec.experts, self.layout.expert_tp
            pieces = []
            for part in experts.parts:
                piece = part.shard.index(shard_i, etp)
                ids = tuple(self.unit_ids.get((experts.name(part, e), experts.region(part, e), piece))
                            for e in range(experts.placement.num_experts))
                infos = tuple(self.tensors.get(experts.name(part, e)) for e in range(experts.placement.num_experts))
                pieces.append((part, ids, infos))
            self._dense[key] = pieces
        parts = self._dense[key]
        placement = spec.experts.placement
        for slot, physical in enumerate(placement.group_slots(group)):
            expert = placement.slots[physical]
            for part, ids, infos in parts:
                unit = ids[expert]
                if unit is not None:
                    yield slot, part, unit, infos[expert]

    def _expert_specs(self, stage: int) -> list[ParamSpec]:
        """The expert-stacked specs of a stage (found once per plan)."""
        key = ("experts", stage)
        if key not in self._dense:
            self._dense[key] = [s for s in self.specs if s.stage == stage and s.experts is not None]
        return self._dense[key]

    def _own(self, src: Source, tp_i: int, spec: ParamSpec, owned: list[int]) -> int | None:
        unit = self.unit_ids.get((src.name, src.region, src.shard.index(tp_i, self.layout.tp)))
        if unit is not None:
            owned.append(unit)
        return unit


def plan(tensors: Mapping[str, TensorInfo], specs: Iterable[ParamSpec], layout: Layout, *,
         ignore: Iterable[str] = ()) -> Plan:
    """Builds the unit table and checks the checkpoint against the specs.

    Args:
        tensors: checkpoint headers, by tensor name.
        specs: one spec per parameter of the (rank-independent) model.
        layout: the parallel layout.
        ignore: regexes of checkpoint names never reported unexpected (added to DEFAULT_IGNORE).

    Returns:
        The plan; ``plan.for_rank(r)`` gives rank r's reads.

    Raises:
        PlanError: a tensor's shape differs from the model's, does not split over
            ``layout.tp``, or feeds two parameters.

    Example:
        >>> from distload.spec import ParamSpec, Source
        >>> p = plan({}, [ParamSpec(name="w", shape=(4,), sources=(Source(name="w", shape=(4,)),))],
        ...          Layout(world_size=2, dp=2))
        >>> p.owners(0)
        (0, 1)
    """
    specs = tuple(specs)
    units: list[Unit] = []
    unit_ids: dict[UnitKey, int] = {}
    fused: dict[str, tuple[int, ...]] = {}  # tensors cut into regions -> their full shape
    for spec in specs:
        check_tiling(spec, layout.tp)
        if spec.experts is not None:
            add_expert_units(units, unit_ids, spec, tensors, layout, regions=fused)
        for src in spec.sources:
            add_units(units, unit_ids, spec, src, tensors, layout, verify=False, regions=fused)
        for src in spec.verify:
            if src.name in tensors:
                add_units(units, unit_ids, spec, src, tensors, layout, verify=True, regions=fused)
    if fused:
        check_regions(units, fused)
    consumed = {u.name for u in units}
    ignored, unexpected, rules = split_leftover((n for n in tensors if n not in consumed), ignore)
    counts = owner_counts(units, layout)
    verify_units = tuple(i for i, u in enumerate(units) if u.verify)
    return Plan(layout, specs, tuple(units), unit_ids, tensors, unexpected, ignored, counts, verify_units, rules)


def split_leftover(leftover: Iterable[str], ignore: Iterable[str] = ()) \
        -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The one definition of *unexpected*, shared by ``load`` and ``distload.track``: of the
    checkpoint tensors nothing consumes, those an ignore rule names (DEFAULT_IGNORE and the
    regexes ``ignore``) are *ignored*, the others *unexpected*.

    Returns:
        ``(ignored, unexpected, rules)``, the names sorted, ``rules[i]`` the pattern that
        ignored ``ignored[i]`` (the first that matches).
    """
    patterns = [re.compile(p) for p in (*DEFAULT_IGNORE, *ignore)]
    leftover = sorted(leftover)
    rule_of = {n: next((p.pattern for p in patterns if p.search(n)), None) for n in leftover}
    ignored = tuple(n for n in leftover if rule_of[n] is not None)
    return ignored, tuple(n for n in leftover if rule_of[n] is None), tuple(rule_of[n] for n in ignored)


def _is_short(src: Source, tp_i: int, tp: int) -> bool:
    shard = src.shard
    start, stop = shard.span(size=src.shape[shard.dim], index=shard.index(tp_i, tp))
    return stop - start < shard.piece_len(src.shape[shard.dim])


def _box(unit: Unit, info: TensorInfo) -> tuple[int, tuple[int, ...], int | None, tuple[int, int]]:
    """``(first byte, shape, cut dim, [start, stop) along it)`` of a unit's piece, in the
    coordinates of its region's box (the whole tensor when it has none)."""
    shape, dim, span, begin = info.shape, unit.dim, unit.span, info.begin
    if dim is not None and not shape:
        shape = (1,)  # a 0-d scalar placed along a dim is read as a 1-element vector
    region = unit.region
    if region is not None:
        for i, n in zip(region.at, shape):  # fix the leading dims: skip to that sub-tensor
            begin += i * math.prod(shape[1:]) * info.itemsize
            shape = shape[1:]
        if region.dim is not None:
            lo, hi = (region.start + span[0], region.start + span[1]) if dim is not None else (region.start,
                                                                                              region.stop)
            return begin, shape, region.dim, (lo, hi)
    return begin, shape, dim, span


def piece_nbytes(unit: Unit, info: TensorInfo) -> int:
    """The bytes ``_read`` requests for ``unit`` of tensor ``info`` (its runs x count)."""
    _, shape, dim, (start, stop) = _box(unit, info)
    whole = info.nbytes if unit.region is None else math.prod(shape) * info.itemsize
    return whole if dim is None else whole // shape[dim] * (stop - start)


def _read(unit_id: int, unit: Unit, offset: int, info: TensorInfo, spec: ParamSpec, *,
          slot: int | None = None) -> Read:
    begin, shape, cut, (start, stop) = _box(unit, info)
    if cut is None:
        nbytes = info.nbytes if unit.region is None else math.prod(shape) * info.itemsize
        return Read(unit=unit_id, param=spec.name, tensor=info, offset=begin, run=nbytes,
                    stride=nbytes, count=1, shape=shape, dim=None, dest=(0, 0), verify=unit.verify, slot=slot)
    inner = math.prod(shape[cut + 1:]) * info.itemsize
    outer = math.prod(shape[:cut])
    piece = (*shape[:cut], stop - start, *shape[cut + 1:])
    run, stride, count = (stop - start) * inner, shape[cut] * inner, outer
    if count > 1 and run == stride:  # the piece spans whole rows: one contiguous run
        run, count = run * count, 1
    dim = unit.dim  # where the piece goes in the parameter (None: it is the whole parameter)
    dest = (offset, offset + stop - start) if dim is not None else (0, 0)
    return Read(unit=unit_id, param=spec.name, tensor=info, offset=begin + start * inner, run=run,
                stride=stride, count=count, shape=piece, dim=dim, dest=dest, verify=unit.verify, slot=slot)
