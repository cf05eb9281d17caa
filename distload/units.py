"""PURE: the canonical unit table. Which pieces of which checkpoint tensors are tracked, what fills
them, and how many ranks own each. Every rank builds the same table from the same specs, headers
and layout, which is what lets tracking merge by index instead of by name.
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass
from typing import Iterable, Mapping

from .checkpoint.header import TensorInfo
from .errors import PlanError
from .experts import ExpertPlacement
from .layout import Layout
from .spec import ParamSpec, Region, Role, Source


@dataclass(frozen=True, kw_only=True, slots=True)
class Unit:
    """One tracked piece of one checkpoint tensor (a TP shard, or the whole tensor)."""

    name: str
    """checkpoint tensor name"""
    param: str
    """the parameter it fills (or is verified against)"""
    role: Role
    """required or optional (a derived parameter has no units)"""
    dim: int | None
    """tensor dim it is cut along; None: the whole tensor"""
    index: int
    """which piece"""
    num_shards: int
    """how many pieces the tensor is cut into"""
    span: tuple[int, int]
    """``[start, stop)`` along ``dim`` (``(0, 0)`` when dim is None)"""
    verify: bool = False
    """read only to check equality (a tied ``lm_head.weight``); never written"""
    stages: tuple[int, ...] = (0,)
    """pipeline stages whose ranks own it (the embedding: the first, and the last when a
    tied LM head there is filled from it)"""
    expert: int | None = None
    """the logical expert, for a unit of an expert-stacked parameter"""
    placement: ExpertPlacement | None = None
    """where that expert's copies live (owners are the ranks hosting one)"""
    region: Region | None = None
    """the box of the checkpoint tensor the unit is cut from (``dim`` and ``span`` count in the
    box); None: the whole tensor"""

    @property
    def label(self) -> str:
        """The unit's tensor name, with its region's label when it has one (``qkv_proj.weight[k]``)."""
        return f"{self.name}[{self.region.label}]" if self.region is not None else self.name


UnitKey = tuple[str, "Region | None", int]
"""(checkpoint name, region or None, piece index): a unit's key in ``Plan.unit_ids``"""


def add_expert_units(units: list[Unit], unit_ids: dict, spec: ParamSpec, tensors: Mapping[str, TensorInfo],
                     layout: Layout, *, regions: dict[str, tuple[int, ...]]) -> None:
    """Adds the units of an expert-stacked parameter: per expert, per part, per piece, keyed
    ``(name, region, piece)`` (the region is None for a tensor per expert, else the expert's box
    of the tensor holding every expert, whose full shape ``regions`` checks once)."""
    experts = spec.experts
    placement = experts.placement
    if placement.ep != layout.ep or spec.shape[0] != placement.slots_per_group:
        raise PlanError(f"expert parameter {spec.name} has {spec.shape[0]} slots for ep={placement.ep}; the layout "
                        f"has ep={layout.ep} and {placement.slots_per_group} slots per group")
    first = tuple(dataclasses.replace(p, name=experts.name(p, 0)) for p in experts.parts)
    check_tiling(ParamSpec(name=spec.name, shape=spec.shape[1:], sources=first), layout.expert_tp)
    for src in first:  # every expert's part has the same shape and split: checked once
        _check_split(spec, src, tensors.get(src.name), layout, placement)
        if src.region is not None:
            if src.region.at[:1] != (0,) or src.region.tensor_shape[:1] != (placement.num_experts,):
                raise PlanError(f"expert parameter {spec.name}: the region of a tensor holding every expert must be "
                                f"expert 0's of a tensor of {placement.num_experts} experts, got {src.region}",
                                tensor=src.name)
            _check_region(spec, src, tensors.get(src.name), regions)
    # one template unit per part and piece; each expert's units differ only in name, region and expert
    templates = [[Unit(name="", param=spec.name, role=spec.role, dim=p.shard.dim, index=i,
                       num_shards=p.shard.num_shards, stages=(spec.stage,), placement=placement,
                       span=p.shard.span(size=p.shape[p.shard.dim], index=i) if p.shard.dim is not None else (0, 0))
                  for i in range(p.shard.num_shards)] for p in experts.parts]
    for expert in range(placement.num_experts):
        for part, pieces in zip(experts.parts, templates):
            name, region = experts.name(part, expert), experts.region(part, expert)
            if region is None:
                _check_shape(spec, name, tensors.get(name), part.shape)
            for unit in pieces:
                if unit.dim is not None and unit.span[0] == unit.span[1]:
                    continue
                key = (name, region, unit.index)
                if key in unit_ids:
                    raise PlanError(f"checkpoint tensor feeds two parameters, "
                                    f"{units[unit_ids[key]].param} and {spec.name}", tensor=name)
                unit_ids[key] = len(units)
                # not dataclasses.replace: 3x slower at 10^6 units
                units.append(Unit(name=name, param=unit.param, role=unit.role, dim=unit.dim, index=unit.index,
                                  num_shards=unit.num_shards, span=unit.span, stages=unit.stages, expert=expert,
                                  placement=placement, region=region))


def _check_split(spec: ParamSpec, src: Source, info: TensorInfo | None, layout: Layout,
                 placement: ExpertPlacement | None) -> None:
    """The source's pieces spread over its TP (or expert TP) ranks and divide its dim."""
    shard = src.shard
    axis, ranks = ("expert tp", layout.expert_tp) if placement is not None else ("tp", layout.tp)
    if ranks % shard.num_shards:
        raise PlanError(f"{shard.num_shards} pieces do not spread over {axis}={ranks} "
                        f"(parameter {spec.name})", tensor=src.name)
    if shard.dim is not None and not shard.pad and src.shape[shard.dim] % shard.num_shards:
        raise PlanError(f"dim {shard.dim} of size {src.shape[shard.dim]} does not split into "
                        f"{shard.num_shards} pieces for tp={layout.tp}", tensor=src.name,
                        file=info.file if info else None)


def add_units(units: list[Unit], unit_ids: dict, spec: ParamSpec, src: Source,
               tensors: Mapping[str, TensorInfo], layout: Layout, *, verify: bool,
               regions: dict[str, tuple[int, ...]]) -> None:
    """Adds the units of one source (one per piece), keyed ``(name, region, piece)``.

    ``regions`` maps each fused tensor seen so far to its full shape: the checkpoint's shape of
    a tensor that regions are cut from is checked once, against the first region's."""
    shard = src.shard
    info = tensors.get(src.name)
    region = src.region
    if region is None:
        _check_shape(spec, src.name, info, src.shape)
    else:
        _check_region(spec, src, info, regions)
    _check_split(spec, src, info, layout, None)
    role = Role.REQUIRED if verify else spec.role
    for index in range(shard.num_shards):
        span = shard.span(size=src.shape[shard.dim], index=index) if shard.dim is not None else (0, 0)
        if shard.dim is not None and span[0] == span[1]:
            continue  # a piece made only of padding rows: no unit
        unit = Unit(name=src.name, param=spec.name, role=role, dim=shard.dim, index=index,
                    num_shards=shard.num_shards, span=span, verify=verify, stages=(spec.stage,), region=region)
        key = (src.name, region, index)
        if key in unit_ids:
            other = units[unit_ids[key]]
            if spec.stage in other.stages or (other.dim, other.num_shards, other.verify) != (unit.dim, unit.num_shards,
                                                                                           unit.verify):
                raise PlanError(f"checkpoint tensor feeds two parameters, {other.param} and {spec.name}",
                                tensor=src.name)
            # the same piece on another stage (a tied LM head's copy of the embedding): one unit
            units[unit_ids[key]] = dataclasses.replace(other, stages=(*other.stages, spec.stage))
            continue
        unit_ids[key] = len(units)
        units.append(unit)


def _check_region(spec: ParamSpec, src: Source, info: TensorInfo | None,
                  regions: dict[str, tuple[int, ...]]) -> None:
    """A region lies inside its tensor, and the tensor's full shape is the checkpoint's (checked
    once per tensor; every later region of it must agree with the first)."""
    region = src.region
    problem = region.problem()
    if problem is not None:
        raise PlanError(f"region {region.label or list(region.at)} of parameter {spec.name}: {problem}",
                        tensor=src.name, file=info.file if info else None)
    known = regions.get(src.name)
    if known is None:
        _check_shape(spec, src.name, info, region.tensor_shape)
        regions[src.name] = region.tensor_shape
    elif known != region.tensor_shape:
        raise PlanError(f"regions of one tensor declare different full shapes {list(known)} and "
                        f"{list(region.tensor_shape)} (parameter {spec.name})", tensor=src.name)


def check_regions(units: Iterable[Unit], fused: Iterable[str]) -> None:
    """No two units read the same bytes of a tensor, and a tensor is either cut into regions or
    taken whole (verify units, which only compare, aside).

    Args:
        units: the unit table.
        fused: the tensors regions are cut from (only their units are looked at).

    Raises:
        PlanError: naming the tensor and both parameters.
    """
    fused = set(fused)
    boxes: dict[str, list[tuple]] = {}
    whole: dict[str, Unit] = {}
    for u in units:
        if u.verify or u.name not in fused:
            continue
        if u.region is None:
            whole.setdefault(u.name, u)
            continue
        r = u.region
        lo, hi = (r.start, r.stop) if r.dim is not None else (0, 0)
        dim = r.dim if r.dim is not None else u.dim
        if u.dim is not None:  # the piece's own cut, in tensor coordinates
            lo, hi = (lo + u.span[0], lo + u.span[1]) if r.dim is not None else u.span
        boxes.setdefault(u.name, []).append((r.at, dim, lo, hi, u))
    for name, found in boxes.items():
        if name in whole:
            raise PlanError(f"checkpoint tensor feeds two parameters, {whole[name].param} and "
                            f"{found[0][4].param}", tensor=name)
        found.sort(key=lambda b: (b[0], b[2], b[3]))
        for (at, dim, lo, hi, u), (at2, dim2, lo2, hi2, u2) in zip(found, found[1:]):
            if at == at2 and (dim != dim2 or dim is None or lo2 < hi) and not (
                    u.region == u2.region and u.index == u2.index):
                raise PlanError(f"regions of parameters {u.param} and {u2.param} overlap", tensor=name)


def _check_shape(spec: ParamSpec, name: str, info: TensorInfo | None, declared: tuple[int, ...]) -> None:
    """A present tensor has the shape the model declares; a scalar stored 0-d (per-tensor scales of
    some FP8 tools) counts as a ``[1]`` vector."""
    if info is not None and info.shape != declared and not (info.shape == () and declared == (1,)):
        raise PlanError(f"checkpoint shape {list(info.shape)} differs from the model's {list(declared)} "
                        f"(parameter {spec.name})", file=info.file, tensor=name)


def owner_counts(units: Iterable[Unit], layout: Layout) -> array:
    """The number of owners of each unit, as C ints (what a complete load's summed records equal).
    Expert units share their count per expert (memoized: a million of them in a DeepSeek plan)."""
    memo: dict = {}
    counts = array("i")
    for u in units:
        if u.placement is None:
            counts.append(_num_owners(u, layout))
            continue
        key = (u.expert, id(u.placement), u.num_shards, u.stages)  # units keep their placement alive
        if key not in memo:
            memo[key] = _num_owners(u, layout)
        counts.append(memo[key])
    return counts


def _num_owners(u: Unit, layout: Layout) -> int:
    if u.placement is not None:  # one shard-holder per hosting group (per replica when ep is 1)
        copies = len(set(u.placement.groups_of(u.expert))) * (layout.dp if layout.ep == 1 else 1)
        return copies * (layout.expert_tp // u.num_shards) * len(u.stages)
    # each TP index appears once per replica, in every stage that holds the unit
    return layout.tp // u.num_shards * layout.dp * len(u.stages)


def check_tiling(spec: ParamSpec, tp: int, tp_ranks: Iterable[int] = (0,)) -> None:
    """Checks that on the given TP ranks the spec's sources tile its parameter exactly.

    Piece lengths are the same on every TP rank by construction (equal pieces,
    padding counted), so planning checks rank 0; tests check every rank.

    Pieces are placed along their shard dim at their offsets; padding rows of a
    vocabulary split are the only part a source may leave uncovered.

    Raises:
        PlanError: a gap, an overlap or a shape that disagrees, naming the parameter.
    """
    if not spec.sources:
        return
    dims = {s.shard.dim for s in spec.sources}
    if len(dims) != 1:
        raise PlanError(f"sources of {spec.name} are cut along different dims {sorted(map(str, dims))}")
    (dim,) = dims
    if dim is None:
        if len(spec.sources) != 1 or spec.sources[0].shape != spec.shape:
            raise PlanError(f"replicated parameter {spec.name} of shape {spec.shape} needs exactly one "
                            f"source of that shape, got {[s.shape for s in spec.sources]}")
        return
    for src in spec.sources:
        other = src.shape[:dim] + src.shape[dim + 1:]
        if len(src.shape) != len(spec.shape) or other != spec.shape[:dim] + spec.shape[dim + 1:]:
            raise PlanError(f"source {src.name} of shape {src.shape} does not fit parameter {spec.name} "
                            f"of shape {spec.shape} along dim {dim}")
    for tp_i in tp_ranks:
        cursor = 0
        for src in sorted(spec.sources, key=lambda s: s.offset):
            start, stop = src.shard.span(size=src.shape[dim], index=src.shard.index(tp_i, tp))
            if src.offset != cursor:
                raise PlanError(f"parameter {spec.name} on TP rank {tp_i}: source {src.name} starts at "
                                f"{src.offset} along dim {dim}, expected {cursor} (gap or overlap)")
            cursor += src.shard.piece_len(src.shape[dim]) if src.shard.pad else stop - start
        if cursor != spec.shape[dim]:
            raise PlanError(f"parameter {spec.name} on TP rank {tp_i}: sources cover {cursor} of "
                            f"{spec.shape[dim]} along dim {dim}")
