"""The quantization-method interface: what a quantized weight is made of, per parameter.

A method never exempts a layer from tracking. Given the geometry of a weight as the
unquantized layer declares it (its checkpoint sources, TP / EP shards and fused offsets,
which dims hold output and input features), it declares every parameter the quantized
weight needs (packed values, scales, zero points, indices) with a role and a shard rule
derived from the weight's own, so they follow their weight through TP, EP and PP. It checks
the headers of what it reads, post-processes after the load, and runs the layer's matmul.
Biases and every other parameter of the layer keep their own, unchanged specs.

Nothing here knows a format: companions are named by the format (``name_of``) and laid out
by the format (``shape_of`` and which of their dims follow the weight's features).

Adding a format is one module (a ``QuantMethod``) and its config parsing (``quant.config``).
A weight that is one expert's box of a tensor holding every expert (gpt-oss's packed experts)
has companions that are the same expert's boxes of their own tensors. A format whose blocks may
be split unevenly (MXFP4: ``ceil(blocks / tp)`` per rank, the last fewer) says so by
``feature_block``; the layer is then built with padded shards on whole blocks (its local size is
not the even split), and its companions follow those shards.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpoint.header import TensorInfo
from ..errors import PlanError
from ..spec import ExpertSources, ParamSpec, Region, Role, Shard, Source


@dataclass(frozen=True, kw_only=True, slots=True)
class Segment:
    """Output rows of one fused part in the local weight (q, k, v of a fused QKV; gate, up)."""

    start: int
    """first local output row"""
    rows: int
    """local output rows of this part"""
    source: Source
    """the part's unquantized checkpoint source"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Declared:
    """One parameter a quantized weight needs: its attribute on the layer, spec and dtype."""

    attr: str
    """attribute name on the layer (``weight``, ``weight_scale_inv``, ``w13_qweight``)"""
    spec: ParamSpec
    """how it is filled"""
    dtype: torch.dtype
    """its dtype; an integer dtype must be the checkpoint's exactly (casts.py refuses others)"""
    stored_dtype: bool = False
    """take the floating dtype the checkpoint stores it in instead, when wider than 8 bits (scales:
    compressed-tensors keeps a bf16 model's in bf16, GPTQ stores float16), so nothing is cast"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Follow:
    """How one dim of a companion tensor (a scale, a packed tensor) follows the weight's features."""

    dim: int
    """the companion's dim (counted per expert for expert tensors)"""
    per: int = 1
    """weight features per entry along it (a block, a group, values per packed word)"""
    what: str = "a scale block"
    """what one entry covers, for the refusal of a shard that cuts one"""


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightGeometry:
    """Where a weight's output and input features come from, derived from its unquantized spec."""

    spec: ParamSpec
    """the unquantized weight spec"""
    segments: tuple[Segment, ...]
    """local output-row ranges per part (one segment when outputs are not fused)"""
    cols: int
    """local input features"""
    out_dim: int = 0
    """dim of the unquantized matrix (per expert) that holds output features"""
    in_dim: int = 1
    """dim that holds input features"""

    @property
    def experts(self) -> ExpertSources | None:
        return self.spec.experts

    @property
    def rows(self) -> int:
        """Local output features (all parts)."""
        return sum(seg.rows for seg in self.segments)

    @classmethod
    def of(cls, spec: ParamSpec, *, out_dim: int = 0, in_dim: int = 1) -> "WeightGeometry":
        """The geometry of a 2-D weight (3-D stacked for experts) with outputs along ``out_dim``.

        Raises:
            PlanError: the spec is not a matrix read from checkpoint tensors.
        """
        parts = spec.experts.parts if spec.experts is not None else spec.sources
        if not parts or len(spec.shape) not in (2, 3) or {out_dim, in_dim} != {0, 1}:
            raise PlanError(f"parameter {spec.name} is not a weight matrix read from the checkpoint, "
                            "so it cannot be quantized")
        local = spec.shape[-2:]
        rows, cols = local[out_dim], local[in_dim]
        if parts[0].shard.dim == out_dim:
            segs = tuple(Segment(start=p.offset, rows=p.shard.piece_len(p.shape[out_dim]), source=p) for p in parts)
        else:  # split by inputs (row-parallel) or whole: one part
            segs = (Segment(start=0, rows=rows, source=parts[0]),)
        return cls(spec=spec, segments=segs, cols=cols, out_dim=out_dim, in_dim=in_dim)

    def tensor_name(self, source: Source, expert: int = 0) -> str:
        """A part's checkpoint name (expert templates formatted for ``expert``)."""
        return source.name if self.experts is None else self.experts.name(source, expert)

    def companion(self, name_of: Callable[[str], str], shape_of: Callable[[int, int], tuple[int, ...]], *,
                  out: Follow | None, inp: Follow | None, blame: Callable[[str], str] | None = None,
                  boxes: bool = False) -> tuple[tuple[Source, ...], tuple[int, ...]]:
        """One companion source per part, split like the weight where a dim of it follows the
        weight's split features, whole where none does; and the local shape they tile.

        Parts are concatenated along ``out.dim`` (along dim 0 when no dim follows outputs).

        Args:
            name_of: a part's checkpoint name -> the companion's.
            shape_of: a part's checkpoint ``(out, in)`` -> the companion's checkpoint shape.
            out, inp: the companion's dims that follow output / input features; None: the
                companion does not follow them (whole on every rank that splits them).
            blame: a part's checkpoint name -> the tensor a refusal names (default: the companion).
            boxes: the format stores a weight that is an expert's box of a tensor of every expert
                as that expert's boxes of its own tensors (MXFP4); False: such a weight is refused.

        Raises:
            PlanError: a TP or expert-TP shard of the weight cuts an entry of a dim that follows it,
                naming the tensor and the degrees that keep whole entries.
        """
        self._refuse_regions(expert_boxes=boxes)
        cat = out.dim if out is not None else 0
        sources, offset, local = [], 0, None
        for seg in self.segments:
            p = seg.source
            full = (p.shape[self.out_dim], p.shape[self.in_dim])
            shape = tuple(shape_of(*full))
            follow = None if p.shard.dim is None else (out if p.shard.dim == self.out_dim else inp)
            piece = list(shape)
            if follow is None:  # whole: at a place of its own when parts are fused
                shard = Shard(dim=cat, num_shards=1) if len(self.segments) > 1 else Shard()
            else:
                size = full[0] if follow is out else full[1]
                self._check_cut(p, size, follow, blame or name_of)
                shard = Shard(dim=follow.dim, num_shards=p.shard.num_shards, pad=p.shard.pad,
                              block=p.shard.block // follow.per if p.shard.pad else 1)
                piece[follow.dim] = shard.piece_len(shape[follow.dim])
            # an expert's box of a tensor of every expert: the companion is that expert's box of its own
            region = None if p.region is None else Region(tensor_shape=(p.region.tensor_shape[0], *shape),
                                                          at=p.region.at)
            sources.append(Source(name=name_of(p.name), shape=shape, shard=shard,
                                  offset=offset if shard.dim == cat else 0, region=region))
            offset += piece[cat] if piece else 0
            local = piece if local is None else [offset if d == cat else n for d, n in enumerate(local)]
        return tuple(sources), tuple(local)

    def _refuse_regions(self, *, expert_boxes: bool = False) -> None:
        """Companions of a region (a part of a fused-on-disk tensor) would be regions of their own
        tensors; only whole experts' boxes of a tensor of every expert have them (``expert_boxes``),
        a range cut inside a tensor (Phi-3's q, k, v; Llama 4's gate and up halves) has none."""
        def refused(box: Region | None) -> bool:
            return box is not None and not (expert_boxes and self.experts is not None and box.dim is None)

        part = next((seg.source for seg in self.segments if refused(seg.source.region)), None)
        if part is not None:
            raise PlanError(f"parameter {self.spec.name} is cut from a fused checkpoint tensor; serialized quantized "
                            "checkpoints of fused-on-disk weights are not supported", tensor=part.name)

    def _check_cut(self, p: Source, size: int, follow: Follow, name_of: Callable[[str], str]) -> None:
        n = p.shard.num_shards
        piece = p.shard.piece_len(size)
        if p.shard.pad and n > 1 and p.shard.block % follow.per:
            raise PlanError(f"parameter {self.spec.name} is split on blocks of {p.shard.block}, which cut "
                            f"{follow.what} of {follow.per}", tensor=self.tensor_name(p))
        if n == 1 or piece % follow.per == 0:
            return
        axis = "tp" if self.experts is None else "expert tp"
        works = [d for d in range(1, size + 1) if size % d == 0 and (d == 1 or (size // d) % follow.per == 0)]
        raise PlanError(f"{'a TP' if self.experts is None else 'an expert TP'} shard of {piece} "
                        f"{'rows' if p.shard.dim == self.out_dim else 'columns'} cuts {follow.what} of "
                        f"{follow.per} (parameter {self.spec.name}); {axis} that keep whole ones: "
                        f"{', '.join(map(str, works))}", tensor=self.tensor_name(dataclasses.replace(
                            p, name=name_of(p.name))))

    def per_part(self, name_of: Callable[[str], str], shape: tuple[int, ...]) -> tuple[Source, ...]:
        """One whole small tensor per part (a per-tensor scale), at consecutive places along dim 0."""
        self._refuse_regions()
        return tuple(Source(name=name_of(seg.source.name), shape=shape, shard=Shard(dim=0, num_shards=1),
                            offset=i * shape[0]) for i, seg in enumerate(self.segments))

    def declare(self, attr: str, suffix: str, sources: tuple[Source, ...], local: tuple[int, ...], *,
                role: Role = Role.REQUIRED) -> ParamSpec:
        """A spec for the parameter ``param_attr(attr, suffix)`` beside this weight, made of ``sources``."""
        base = self.spec
        name = f"{base.name.rpartition('.')[0]}.{param_attr(attr, suffix)}"
        if base.experts is not None:
            return ParamSpec(name=name, shape=(base.shape[0], *local), role=role,
                             experts=dataclasses.replace(base.experts, parts=sources))
        return ParamSpec(name=name, shape=local, role=role, sources=sources)

    def declared(self, attr: str, suffix: str, sources: tuple[Source, ...], local: tuple[int, ...],
                 dtype: torch.dtype, *, stored_dtype: bool = False) -> Declared:
        """``declare`` wrapped with the parameter's dtype."""
        return Declared(attr=param_attr(attr, suffix), dtype=dtype, stored_dtype=stored_dtype,
                        spec=self.declare(attr, suffix, sources, local))


def beside(suffix: str) -> Callable[[str], str]:
    """Names a companion ``<module>.<suffix>`` beside a part's ``<module>.<tensor>``."""
    return lambda name: f"{name.rpartition('.')[0]}.{suffix}"


def param_attr(weight_attr: str, suffix: str) -> str:
    """The layer attribute of a weight's companion: ``weight`` + ``input_scale`` -> ``input_scale``,
    ``w13`` + ``weight_scale_inv`` -> ``w13_weight_scale_inv``."""
    return suffix if weight_attr == "weight" else f"{weight_attr}_{suffix}"


def checkpoint_names(spec: ParamSpec) -> tuple[str, ...]:
    """The checkpoint names a spec reads (expert templates formatted for every expert)."""
    if spec.experts is None:
        return tuple(s.name for s in spec.sources)
    e = spec.experts
    return tuple(e.name(p, x) for x in range(e.placement.num_experts) for p in e.parts)


def whole_entries(size: int, per: int) -> int:
    """Entries of ``per`` features that cover ``size`` (the last one possibly partial)."""
    return math.ceil(size / per)


class QuantMethod:
    """How a quantized weight is stored in the checkpoint, declared, checked, post-processed
    and applied. Layers call it through ``quant.layer.Quantizable``.

    A method instance describes a scheme (e.g. int4 in groups of 128); it keeps no per-layer
    state (a layer may cache what a method prepares for its device, see ``apply``).
    """

    name: str = ""
    """the scheme, as reports and errors name it"""
    feature_block: int | None = None
    """a TP shard of a weight in this format may end unevenly, on whole blocks of this many
    features (each rank ``ceil(blocks / tp)``, the last fewer, padded with zeros); the layer asks
    before it is built (``QuantConfig.feature_block``). None: the layer's own even split"""

    def declare(self, attr: str, geometry: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        """Every parameter replacing the unquantized weight ``attr`` (the weight itself where it is kept).

        Raises:
            PlanError: a shard of the layout cuts what the format stores whole (a group, a word).
        """
        raise NotImplementedError

    def refusal(self, declared: Declared, info: TensorInfo) -> str | None:
        """Why the checkpoint tensor ``info`` cannot fill ``declared`` (dtype and format rules beyond
        the shape and cast checks every tensor gets); None when it can."""
        return None

    @classmethod
    def unquantized_refusal(cls, info: TensorInfo, param: str) -> str | None:
        """Why ``info``, read by the parameter ``param`` that no method declared, cannot be read there:
        a dtype only this format's weights are stored in. None when it can."""
        return None

    def dequantize(self, layer, attr: str, geometry: WeightGeometry) -> torch.Tensor:
        """The weight in float32, ``(out, in)`` per matrix, from the layer's loaded parameters."""
        raise NotImplementedError

    def post_load(self, layer, attr: str, geometry: WeightGeometry) -> None:
        """Runs once per rank after the merge proved the load complete (fills derived parameters,
        checks values the headers cannot show)."""

    def apply(self, layer, attr: str, geometry: WeightGeometry, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T (+ b)`` of a 2-D weight: by default the weight dequantized to ``x``'s dtype."""
        return F.linear(x, self.dequantize(layer, attr, geometry).to(x.dtype), bias)
