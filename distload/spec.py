"""What a parameter is made of: the checkpoint units that fill it, and their role.

A spec is data. Parallel layers declare one per parameter; the planner turns specs,
checkpoint headers and a layout into reads, and tracking counts units. A *unit* is
one checkpoint tensor name and the piece of it one parameter needs on one shard.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from torch import nn

from .errors import PlanError

if TYPE_CHECKING:
    from .experts import ExpertPlacement


class Role(str, enum.Enum):
    """Where a parameter's values come from (design.md section 3)."""

    REQUIRED = "required"
    """from the checkpoint; absence is *missing*"""
    OPTIONAL = "optional"
    """may be absent; then filled with ``ParamSpec.default`` and reported *defaulted*"""
    DERIVED = "derived"
    """computed after loading from ``ParamSpec.derived_from``; never read"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Shard:
    """How one checkpoint tensor is split over the tensor-parallel ranks.

    ``num_shards`` pieces of equal size are cut along ``dim``; TP rank ``t`` of ``tp``
    takes piece ``t * num_shards // tp``, so with fewer pieces than ranks each piece
    is replicated on ``tp // num_shards`` consecutive ranks (GQA KV heads).

    Example:
        >>> Shard(dim=0, num_shards=2).span(size=8, index=1)
        (4, 8)
        >>> Shard(dim=0, num_shards=4, pad=True).span(size=10, index=3)
        (9, 10)
        >>> Shard(dim=0, num_shards=4, pad=True, block=32).span(size=2880, index=3)  # 23, 23, 23, 21 blocks
        (2208, 2880)
    """

    dim: int | None = None
    """tensor dim that is split; None: every rank takes the whole tensor"""
    num_shards: int = 1
    """number of distinct pieces"""
    pad: bool = False
    """pieces are ceil(size / num_shards) long and the last ones may be short or empty
    (vocabulary padding); otherwise the size must divide"""
    block: int = 1
    """with ``pad``: pieces are whole blocks of this many entries, ceil(blocks / num_shards) of them
    (MXFP4's blocks of 32 features), the last ones fewer or none"""

    def index(self, tp_rank: int, tp: int) -> int:
        """Returns which piece TP rank ``tp_rank`` of ``tp`` takes."""
        return tp_rank * self.num_shards // tp

    def piece_len(self, size: int) -> int:
        """Returns the (padded) length of one piece along ``dim``."""
        if not self.pad:
            return size // self.num_shards
        return -(-(-(-size // self.block)) // self.num_shards) * self.block

    def span(self, *, size: int, index: int) -> tuple[int, int]:
        """Returns ``[start, stop)`` of piece ``index`` along ``dim`` of a tensor of that size."""
        n = self.piece_len(size)
        start = min(index * n, size)
        return start, min(start + n, size)


@dataclass(frozen=True, kw_only=True, slots=True)
class Region:
    """A box of one checkpoint tensor that a ``Source`` takes as if it were the whole tensor.

    The box fixes the tensor's leading dims to ``at`` (they are dropped) and, when ``dim`` is
    set, takes ``[start, stop)`` along ``dim`` of what is left. The source's ``shape`` is the
    box's shape and its ``shard`` cuts the box, along ``dim`` or, for a box cut along no dim,
    along any one dim; each region x shard is its own unit (key ``(name, region, piece)``).
    The cases it is made for, with no change of format:

    - a part of a fused Linear weight (Phi-3 ``qkv_proj`` ``[q | k | v]`` rows): ``dim=0``,
      the part's row range, sharded along dim 0 inside it;
    - an expert of a fused expert tensor ``[E, hidden, 2I]``: ``at=(e,)``; Llama 4's gate and
      up, the two halves of the last dim: ``dim=1``, ``[0, I)`` or ``[I, 2I)``, sharded along
      dim 1 (a unit per expert per part per shard);
    - gpt-oss's interleaved gate/up columns: ``at=(e,)``, ``dim=1`` over all ``2I`` columns,
      sharded along dim 1, so a TP shard is one contiguous column range holding both gate and
      up columns (a unit per expert per shard; the layer de-interleaves in its forward).

    Example:
        >>> Region(tensor_shape=(96, 64), dim=0, start=64, stop=80, label="k").shape
        (16, 64)
        >>> Region(tensor_shape=(8, 64, 192), at=(5,)).shape
        (64, 192)
    """

    tensor_shape: tuple[int, ...]
    """the checkpoint tensor's full shape (checked once per tensor)"""
    at: tuple[int, ...] = ()
    """indices fixing the tensor's leading dims (an expert's index along dim 0)"""
    dim: int | None = None
    """dim of the box (counted after ``at``) that ``[start, stop)`` cuts; None: no cut"""
    start: int = 0
    """first index along ``dim``"""
    stop: int = 0
    """end (exclusive) along ``dim``"""
    label: str = ""
    """what the box is (``k``, ``gate``): names it in the ``skip_units`` hook (``name[label]``)"""

    @property
    def shape(self) -> tuple[int, ...]:
        """The box's shape (the ``Source.shape`` of a source that takes it)."""
        rest = self.tensor_shape[len(self.at):]
        if self.dim is None:
            return rest
        return (*rest[:self.dim], self.stop - self.start, *rest[self.dim + 1:])

    def problem(self) -> str | None:
        """Why the box does not lie inside ``tensor_shape``; None when it does."""
        full = self.tensor_shape
        if len(self.at) > len(full) or any(not 0 <= i < n for i, n in zip(self.at, full)):
            return f"index {list(self.at)} is outside the tensor's shape {list(full)}"
        rest = full[len(self.at):]
        if self.dim is not None and (not 0 <= self.dim < len(rest) or not 0 <= self.start < self.stop <= rest[self.dim]):
            return (f"range [{self.start}, {self.stop}) along dim {len(self.at) + self.dim} is outside the "
                    f"tensor's shape {list(full)}")
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Source:
    """One checkpoint tensor (or a region of one) feeding (part of) a parameter."""

    name: str
    """checkpoint tensor name"""
    shape: tuple[int, ...]
    """the checkpoint tensor's full shape, as the model expects it (with a region: the region's)"""
    shard: Shard = Shard()
    """how the tensor (or region) is split over TP ranks"""
    offset: int = 0
    """where this source's piece starts in the parameter along ``shard.dim`` (fused parameters)"""
    region: Region | None = None
    """the box of the checkpoint tensor this source takes (a fused-on-disk tensor); None: all of it"""

    def __post_init__(self) -> None:
        if self.region is not None:
            r = self.region
            if self.shape != r.shape:
                raise PlanError(f"source shape {list(self.shape)} differs from its region's {list(r.shape)}",
                                tensor=self.name)
            if r.dim is not None and self.shard.dim not in (None, r.dim):
                raise PlanError(f"a region cut along dim {r.dim} is sharded along dim {self.shard.dim}; "
                                "only along the region's own dim", tensor=self.name)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertSources:
    """The checkpoint tensors of every expert, stacked into one expert parameter ``[local slots, ...]``.

    Each ``part`` is placed in the slot's sub-tensor like a ``Source`` (``offset`` along
    ``shard.dim``, which counts the per-expert dims, and ``shard.num_shards`` pieces over the
    expert's ranks). A part is either a tensor per expert, its ``name`` with an ``{expert}``
    field (``experts.{expert}.up_proj.weight``), or one tensor holding every expert along dim 0
    (gpt-oss's and Llama 4's ``experts.gate_up_proj``): then its ``region`` is expert 0's box,
    ``at=(0,)``, and expert ``e``'s is the same box at ``(e,)``, labelled ``e`` (``e.gate`` for a
    box labelled ``gate``), a unit of its own per shard.

    Example:
        >>> box = Region(tensor_shape=(4, 8, 6), at=(0,), dim=1, start=3, stop=6, label="up")
        >>> up = Source(name="experts.gate_up_proj", shape=(8, 3), region=box)
        >>> ExpertSources(placement=None, parts=(up,)).region(up, 2).label
        '2.up'
    """

    placement: "ExpertPlacement"
    """which slots this rank's group hosts and which expert each slot holds"""
    parts: tuple[Source, ...]
    """one per source matrix (gate, up; or down): ``name`` has an ``{expert}`` field, or
    ``region`` is expert 0's box of a tensor holding every expert"""

    def name(self, part: Source, expert: int) -> str:
        """The checkpoint tensor holding ``expert``'s ``part``."""
        return part.name.format(expert=expert) if part.region is None else part.name

    def region(self, part: Source, expert: int) -> Region | None:
        """``expert``'s box of the tensor holding every expert; None for a tensor per expert."""
        box = part.region
        if box is None:
            return None
        label = f"{expert}.{box.label}" if box.label else str(expert)
        return Region(tensor_shape=box.tensor_shape, at=(expert, *box.at[1:]), dim=box.dim, start=box.start,
                      stop=box.stop, label=label)


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamSpec:
    """Declares how one parameter (or persistent buffer) of a rank's model is filled.

    Example:
        >>> spec = ParamSpec(name="model.norm.weight", shape=(64,),
        ...                  sources=(Source(name="model.norm.weight", shape=(64,)),))
        >>> spec.role
        <Role.REQUIRED: 'required'>
    """

    name: str
    """the parameter's dotted name in the model"""
    shape: tuple[int, ...]
    """the parameter's shape on one rank"""
    role: Role = Role.REQUIRED
    """required / optional / derived"""
    sources: tuple[Source, ...] = ()
    """checkpoint tensors that fill it, each a unit per shard; empty for derived"""
    default: float | None = None
    """value of an optional parameter whose sources are absent"""
    derived_from: tuple[str, ...] = ()
    """checkpoint names a derived parameter is computed from"""
    verify: tuple[Source, ...] = ()
    """checkpoint tensors that, when present, must equal this parameter (a tied
    ``lm_head.weight`` saved beside the embedding); read, compared, counted as consumed"""
    stage: int = 0
    """the pipeline stage whose ranks hold this parameter (set by the loader)"""
    experts: ExpertSources | None = None
    """for an expert-stacked parameter: its per-expert sources (``sources`` stays empty)"""

    def __post_init__(self) -> None:
        if self.role is Role.DERIVED and self.sources:
            raise PlanError(f"derived parameter {self.name} must not declare sources; "
                            "name them in derived_from")
        if self.role is Role.OPTIONAL and self.default is None:
            raise PlanError(f"optional parameter {self.name} needs a documented default")


class SpecProvider:
    """Mixin for modules that declare the specs of their own parameters.

    ``param_specs(path)`` returns one spec per direct parameter and per persistent
    buffer that comes from the checkpoint; ``path`` is the module's dotted name.
    Parameters of modules that are not spec providers default to a required,
    replicated unit named like the parameter itself.
    """

    def param_specs(self, path: str) -> Iterable[ParamSpec]:
        raise NotImplementedError


class PostLoad:
    """Mixin for modules that compute derived parameters once the load is proven complete
    (online quantization, a scale copied from a shared legacy scale)."""

    def computed_params(self) -> tuple[str, ...]:
        """The module's own parameters that ``process_after_loading`` fills."""
        return ()

    def process_after_loading(self) -> None:
        raise NotImplementedError


def sibling(path: str, name: str) -> str:
    """Returns the dotted name ``name`` beside the module at ``path`` (``a.b.qkv`` -> ``a.b.q``)."""
    parent, _, _ = path.rpartition(".")
    return f"{parent}.{name}" if parent else name


def collect_specs(model: nn.Module) -> tuple[ParamSpec, ...]:
    """Returns one spec per parameter and persistent buffer of ``model``, in module order.

    Raises:
        PlanError: a spec names no registered parameter or persistent buffer; a derived
            parameter shares no storage with a loaded one (nothing would fill it); or a
            non-persistent buffer would be left uninitialized by materializing.
    """
    specs: list[ParamSpec] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        transient = [prefix + n for n, _ in module.named_buffers(recurse=False)
                     if n in module._non_persistent_buffers_set]
        if transient:
            raise PlanError(f"non-persistent buffer {transient[0]} would hold uninitialized memory after "
                            "loading (models are built on the meta device): compute it in forward, or make it "
                            "persistent and give it a spec")
        local = dict(module.named_parameters(recurse=False))
        local.update(dict(module.named_buffers(recurse=False)))
        declared: dict[str, ParamSpec] = {}
        if isinstance(module, SpecProvider):
            for spec in module.param_specs(path):
                attr = spec.name[len(prefix):] if spec.name.startswith(prefix) else None
                if attr is None or attr not in local:
                    raise PlanError(f"module {path or '<root>'} declares a spec for {spec.name}, "
                                    "which is not one of its registered parameters or persistent buffers")
                declared[attr] = spec
        for attr, tensor in local.items():
            if id(tensor) in seen:  # shared (tied) tensors are filled once
                continue
            seen.add(id(tensor))
            spec = declared.pop(attr, None)
            if spec is None:
                full = prefix + attr
                spec = ParamSpec(name=full, shape=tuple(tensor.shape),
                                 sources=(Source(name=full, shape=tuple(tensor.shape)),))
            elif tuple(tensor.shape) != spec.shape:
                raise PlanError(f"spec of {spec.name} says shape {spec.shape}, "
                                f"the parameter has {tuple(tensor.shape)}")
            elif spec.role is Role.DERIVED and not (isinstance(module, PostLoad) and attr in module.computed_params()):
                # a derived parameter is a tied view of a loaded one, or computed after loading
                raise PlanError(f"derived parameter {spec.name} shares no storage with a loaded parameter "
                                "and its module computes nothing after loading, so nothing would fill it")
            specs.append(spec)
        # derived views of tied tensors (lm_head.weight = embedding) stay in the table
        specs.extend(declared.values())
    return tuple(specs)

