"""The quantization-method interface: what a quantized weight is made of, per parameter.

A method never exempts a layer from tracking. Given the spec of a weight as the
unquantized layer declares it (its checkpoint sources, TP / EP shards and fused
offsets), it declares every parameter the quantized weight needs (the FP8 weight,
its scales, an activation scale) with a role and a shard rule derived from the
weight's own, so scales follow their weight through TP and EP. Biases and every
other parameter of the layer keep their own, unchanged specs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import PlanError
from ..spec import ExpertSources, ParamSpec, Role, Shard, Source

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""largest finite float8_e4m3fn value"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Segment:
    """Rows of one fused part in the local weight (q, k, v of a fused QKV; gate, up)."""

    start: int
    """first local row"""
    rows: int
    """local rows of this part"""
    source: Source
    """the part's checkpoint source (its name ends in ``.weight``)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Declared:
    """One parameter a quantized weight needs: its attribute on the layer, spec and dtype."""

    attr: str
    """attribute name on the layer (``weight``, ``weight_scale_inv``, ``w13_input_scale``)"""
    spec: ParamSpec
    """how it is filled"""
    dtype: torch.dtype
    """its dtype"""
    stored_dtype: bool = False
    """take the floating dtype the checkpoint stores it in instead, when wider than FP8 (scales:
    compressed-tensors keeps a bf16 model's in bf16), so nothing is cast"""


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightGeometry:
    """Where a weight's rows and columns come from, derived from its unquantized spec."""

    spec: ParamSpec
    """the unquantized weight spec"""
    segments: tuple[Segment, ...]
    """local row ranges per part (one segment when rows are not fused)"""
    cols: int
    """local columns (input features)"""

    @property
    def experts(self) -> ExpertSources | None:
        return self.spec.experts

    @classmethod
    def of(cls, spec: ParamSpec) -> "WeightGeometry":
        parts = spec.experts.parts if spec.experts is not None else spec.sources
        rows, cols = spec.shape[-2], spec.shape[-1]
        if not parts or any(not p.name.endswith(".weight") for p in parts) or len(spec.shape) not in (2, 3):
            raise PlanError(f"parameter {spec.name} is not a weight matrix made of '.weight' tensors, "
                            "so it cannot be quantized")
        if parts[0].shard.dim == 0:
            segs = tuple(Segment(start=p.offset, rows=p.shard.piece_len(p.shape[0]), source=p) for p in parts)
        else:  # split by columns (row-parallel) or whole: one part
            segs = (Segment(start=0, rows=rows, source=parts[0]),)
        return cls(spec=spec, segments=segs, cols=cols)

    def split_sources(self, suffix: str, shape_of, *, block: tuple[int | None, int | None]) -> tuple[Source, ...]:
        """One scale source per part, named ``X.<suffix>`` beside ``X.weight``, split like the weight.

        Args:
            shape_of: a part's checkpoint ``(out, in)`` -> the scale's checkpoint shape.
            block: weight rows / columns per scale entry; None where the scale does not
                follow the weight's split (a per-channel scale is whole along columns).

        Raises:
            PlanError: a TP or expert-TP shard of the weight cuts a scale block.
        """
        out, offset = [], 0
        for seg in self.segments:
            p = seg.source
            shape, dim = shape_of(p.shape), p.shard.dim
            if dim is None or block[dim] is None:
                shard = Shard()
            else:
                piece, b = p.shard.piece_len(p.shape[dim]), block[dim]
                if p.shard.num_shards > 1 and piece % b:
                    raise PlanError(f"{'a TP' if self.experts is None else 'an expert TP'} shard of {piece} "
                                    f"{'rows' if dim == 0 else 'columns'} cuts a scale block of {b} "
                                    f"(parameter {self.spec.name}); choose a tp whose shards are whole blocks",
                                    tensor=p.name if self.experts is None else self.experts.name(p, 0))
                shard = Shard(dim=dim, num_shards=p.shard.num_shards)  # whole (1 piece) at a fused offset too
            out.append(Source(name=_beside(p.name, suffix), shape=shape, shard=shard,
                              offset=offset if shard.dim == 0 else 0))
            if shard.dim == 0:
                offset += shard.piece_len(shape[0])
        return tuple(out)

    def per_part_sources(self, suffix: str, shape: tuple[int, ...]) -> tuple[Source, ...]:
        """One whole one-element tensor per part (a per-tensor scale), at consecutive places along dim 0."""
        return tuple(Source(name=_beside(seg.source.name, suffix), shape=shape, shard=Shard(dim=0, num_shards=1),
                            offset=i) for i, seg in enumerate(self.segments))

    def declare(self, attr: str, suffix: str, sources: tuple[Source, ...], local: tuple[int, ...], *,
                role: Role = Role.REQUIRED) -> ParamSpec:
        """A spec for the parameter ``attr`` beside this weight, made of ``sources`` (one per part)."""
        base = self.spec
        name = f"{base.name.rpartition('.')[0]}.{param_attr(attr, suffix)}"
        if base.experts is not None:
            return ParamSpec(name=name, shape=(base.shape[0], *local), role=role,
                             experts=dataclasses.replace(base.experts, parts=sources))
        return ParamSpec(name=name, shape=local, role=role, sources=sources)


def _beside(weight_name: str, suffix: str) -> str:
    return weight_name[: -len("weight")] + suffix


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


class QuantMethod:
    """How a quantized weight is stored in the checkpoint, declared, post-processed and applied.

    A method instance describes a scheme (e.g. FP8 with 16x16 blocks); it keeps no
    per-layer state. Layers call it through ``quant.layer.Quantizable``.
    """

    name: str = ""
    """the scheme, as reports and errors name it"""

    def declare(self, attr: str, geometry: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        """Every parameter replacing the unquantized weight ``attr``, the weight itself included."""
        raise NotImplementedError

    def dequantize(self, layer, attr: str, geometry: WeightGeometry) -> torch.Tensor:
        """The weight in float32, from the layer's loaded parameters."""
        raise NotImplementedError

    def post_load(self, layer, attr: str, geometry: WeightGeometry) -> None:
        """Runs once per rank after the merge proved the load complete (fills derived parameters)."""

    def row_scales(self, layer, attr: str, geometry: WeightGeometry) -> torch.Tensor | None:
        """One float32 scale per output row, when the scheme has them (for scaled FP8 matmuls)."""
        return None

    def block_scales(self, layer, attr: str, geometry: WeightGeometry) -> torch.Tensor | None:
        """Scales of whole 128 x 128 blocks, ``[rows / 128, cols / 128]``, when the scheme has them."""
        return None

    def input_scale(self, layer, attr: str) -> torch.Tensor | None:
        """A static per-tensor activation scale, when the checkpoint has one."""
        return None


def fp8_weight(attr: str, geometry: WeightGeometry) -> Declared:
    """The weight itself, stored FP8, with the unquantized spec's sources (same units)."""
    return Declared(attr=attr, spec=geometry.spec, dtype=FP8)


def rows_scale(scales: torch.Tensor, geometry: WeightGeometry) -> torch.Tensor:
    """Expands one scale per part (``[..., parts]``) to one per local row (``[..., rows]``)."""
    counts = torch.tensor([s.rows for s in geometry.segments], device=scales.device)
    return scales.repeat_interleave(counts, dim=-1)

