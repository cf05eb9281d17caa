"""FP8 weights: serialized (block-wise, per-channel, per-tensor) and quantized while loading.

Serialized schemes read the FP8 weight and its scales as they are in the checkpoint
(units like any other) and dequantize in forward, or run a real FP8 matmul where the
device has one. Online FP8 reads the bf16 / fp16 weight (the tracked units), then derives
the FP8 weight and one scale per row after the load is proven complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint.header import TensorInfo
from ..spec import ParamSpec, Role
from .base import Declared, Follow, QuantMethod, WeightGeometry, beside, checkpoint_names, param_attr

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""largest finite float8_e4m3fn value"""
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""what counts as FP8 in a checkpoint; the schemes read e4m3 only"""


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FP8Method(QuantMethod):
    """What FP8 schemes share: an FP8 weight checked against the headers, and a forward that runs
    ``torch._scaled_mm`` with the scheme's row or block scales where the device allows one."""

    def refusal(self, declared: Declared, info: TensorInfo) -> str | None:
        if declared.dtype != FP8 or declared.spec.role is Role.DERIVED:
            return None
        if info.dtype in FP8_DTYPES and info.dtype != FP8:
            return (f"the checkpoint stores this weight as {_dtype(info.dtype)}; the FP8 schemes read "
                    f"float8_e4m3fn only (parameter {declared.spec.name})")
        if info.dtype not in FP8_DTYPES:
            return (f"the quantization config makes this layer FP8, but the checkpoint stores its weight as "
                    f"{_dtype(info.dtype)} (parameter {declared.spec.name})")
        return None

    @classmethod
    def unquantized_refusal(cls, info: TensorInfo, param: str) -> str | None:
        if info.dtype not in FP8_DTYPES:
            return None
        return (f"the checkpoint stores this tensor as {_dtype(info.dtype)}, but its layer is left unquantized "
                f"(parameter {param}) by quantization_config's ignore list or by the model (routers, shared-expert "
                "gates, embeddings and the LM head are never quantized)")

    def row_scales(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor | None:
        """One float32 scale per output row, when the scheme has them (for scaled FP8 matmuls)."""
        return None

    def block_scales(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor | None:
        """Scales of whole 128 x 128 blocks, ``[rows / 128, cols / 128]``, when the scheme has them."""
        return None

    def input_scale(self, layer, attr: str) -> torch.Tensor | None:
        """A static per-tensor activation scale, when the checkpoint has one."""
        return None

    def apply(self, layer, attr: str, g: WeightGeometry, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """A real FP8 matmul where the scheme has row scales (or whole 128 x 128 blocks, on Hopper)
        and the device runs one, otherwise the weight dequantized to ``x``'s dtype."""
        weight = getattr(layer, attr)
        if weight.dtype == FP8 and scaled_mm_supported(x, weight.shape[0]):
            rows = self.row_scales(layer, attr, g)
            if rows is not None and _path_works("row", x.device):
                return fp8_linear(x, weight, rows, self.input_scale(layer, attr), bias)
            blocks = self.block_scales(layer, attr, g)
            if blocks is not None and torch.cuda.get_device_capability(x.device) == (9, 0) and \
                    _path_works("block", x.device):
                return fp8_block_linear(x, weight, blocks, bias)
        return F.linear(x, self.dequantize(layer, attr, g).to(x.dtype), bias)


def fp8_weight(attr: str, geometry: WeightGeometry) -> Declared:
    """The weight itself, stored FP8, with the unquantized spec's sources (same units)."""
    return Declared(attr=attr, spec=geometry.spec, dtype=FP8)


def rows_scale(scales: torch.Tensor, geometry: WeightGeometry) -> torch.Tensor:
    """Expands one scale per part (``[..., parts]``) to one per local row (``[..., rows]``)."""
    counts = torch.tensor([s.rows for s in geometry.segments], device=scales.device)
    return scales.repeat_interleave(counts, dim=-1)


@dataclass(frozen=True, kw_only=True, slots=True)
class SerializedFP8(FP8Method):
    """FP8 weights with float32 scales stored in the checkpoint.

    ``strategy`` is ``block`` (one scale per ``block`` = [rows, cols] tile, the last tile of a
    dim possibly partial), ``channel`` (one per output row, ``[out, 1]``) or ``tensor``
    (one per checkpoint matrix, ``[1]``; a fused QKV holds one per part). Scales are named
    ``X.<scale_suffix>`` beside ``X.weight``: ``weight_scale_inv`` in DeepSeek-style ``fp8``
    checkpoints, ``weight_scale`` in compressed-tensors ones; both multiply the FP8 values.
    With ``static_input`` every matrix also has a per-tensor ``X.input_scale``.
    """

    strategy: str
    """``block``, ``channel`` or ``tensor``"""
    scale_suffix: str = "weight_scale"
    """checkpoint (and attribute) name of the scale beside ``weight``"""
    block: tuple[int, int] = (128, 128)
    """rows x columns per scale (block strategy)"""
    static_input: bool = False
    """activations use a static scale from the checkpoint (``input_scale``)"""
    name: str = "fp8"
    """how reports name the scheme"""

    def declare(self, attr: str, g: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        out = [fp8_weight(attr, g)]
        name_of, weight = beside(self.scale_suffix), (lambda n: n)  # a cut block names the FP8 weight
        if self.strategy == "block":
            bn, bk = self.block
            sources, local = g.companion(name_of, lambda o, i: (-(-o // bn), -(-i // bk)), blame=weight,
                                         out=Follow(dim=0, per=bn), inp=Follow(dim=1, per=bk))
        elif self.strategy == "channel":
            sources, local = g.companion(name_of, lambda o, i: (o, 1), out=Follow(dim=0), inp=None, blame=weight)
        else:
            sources, local = g.per_part(name_of, (1,)), (len(g.segments),)
        out.append(g.declared(attr, self.scale_suffix, sources, local, torch.float32, stored_dtype=True))
        if self.static_input:
            out.append(g.declared(attr, "input_scale", g.per_part(beside("input_scale"), (1,)), (len(g.segments),),
                                  torch.float32, stored_dtype=True))
        return tuple(out)

    def dequantize(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor:
        w = getattr(layer, attr).float()
        scale = getattr(layer, param_attr(attr, self.scale_suffix))
        if self.strategy == "channel":
            return w * scale
        if self.strategy == "tensor":
            return w * rows_scale(scale, g)[..., None]
        return dequantize_blocks(w, scale, self.block, g)

    def row_scales(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor | None:
        scale = getattr(layer, param_attr(attr, self.scale_suffix))
        if self.strategy == "channel":
            return scale[..., 0]
        if self.strategy == "tensor":
            return rows_scale(scale, g)
        return None

    def block_scales(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor | None:
        """The ``[rows / 128, cols / 128]`` scales when they tile the local weight in whole
        128 x 128 blocks (every fused part too): the layout DeepSeek-style FP8 matmuls take."""
        # K a multiple of 512: the [K/128, N/128] scales' stride must be 16-byte aligned, and torch
        # takes no padded stride; measured on an H100, other K give wrong results without an error
        if self.strategy != "block" or self.block != (128, 128) or g.cols % 512 or \
                any(seg.rows % 128 for seg in g.segments):
            return None
        return getattr(layer, param_attr(attr, self.scale_suffix))

    def input_scale(self, layer, attr: str) -> torch.Tensor | None:
        # one activation scale for a fused layer: the largest part's never overflows
        return getattr(layer, param_attr(attr, "input_scale")).amax() if self.static_input else None


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], g: WeightGeometry) -> torch.Tensor:
    """``w * scale`` with each scale entry spread over its ``block`` tile, part by part (a
    fused part's blocks start at its own first row; the last tile of a part may be partial)."""
    bn, bk = block
    out = torch.empty_like(w)
    cols = w.shape[-1]
    srow = 0
    for seg in g.segments:
        n = -(-seg.rows // bn)
        tile = scale[..., srow:srow + n, :].repeat_interleave(bn, dim=-2)[..., :seg.rows, :]
        tile = tile.repeat_interleave(bk, dim=-1)[..., :cols]
        out[..., seg.start:seg.start + seg.rows, :] = w[..., seg.start:seg.start + seg.rows, :] * tile
        srow += n
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class OnlineFP8(FP8Method):
    """``--quantize fp8``: the checkpoint's bf16 / fp16 / fp32 weight is read into ``<attr>_source``
    (the tracked units); after the merge, ``<attr>`` becomes FP8 with one float32 scale per
    output row (``<attr>_scale``, amax / 448), both derived from the source's checkpoint
    names, and the source is freed."""

    name: str = "online fp8 (per-channel)"

    def declare(self, attr: str, g: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        base = g.spec
        names = checkpoint_names(base)
        prefix = base.name.rpartition(".")[0]
        source = ParamSpec(name=f"{prefix}.{attr}_source", shape=base.shape, sources=base.sources,
                           experts=base.experts)
        weight = ParamSpec(name=base.name, shape=base.shape, role=Role.DERIVED, derived_from=names)
        scale = ParamSpec(name=f"{prefix}.{param_attr(attr, 'weight_scale')}", shape=(*base.shape[:-1], 1),
                          role=Role.DERIVED, derived_from=names)
        return (Declared(attr=f"{attr}_source", spec=source, dtype=model_dtype),
                Declared(attr=attr, spec=weight, dtype=FP8),
                Declared(attr=param_attr(attr, "weight_scale"), spec=scale, dtype=torch.float32))

    def post_load(self, layer, attr: str, g: WeightGeometry) -> None:
        source = getattr(layer, f"{attr}_source")
        weight, scale = getattr(layer, attr), getattr(layer, param_attr(attr, "weight_scale"))
        with torch.no_grad():
            # an expert stack slot by slot: float32 temporaries of one expert, not of the stack
            for src, w, s in zip(*(t.unsqueeze(0) if t.dim() == 2 else t for t in (source, weight, scale))):
                q, row_scale = quantize_rows(src)
                w.copy_(q)
                s.copy_(row_scale)
        layer.register_parameter(f"{attr}_source", None)  # frees the bf16 copy

    def dequantize(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor:
        return getattr(layer, attr).float() * getattr(layer, param_attr(attr, "weight_scale"))

    def row_scales(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor | None:
        return getattr(layer, param_attr(attr, "weight_scale"))[..., 0]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (FP8 values, float32 scale ``[..., rows, 1]``) with ``values * scale ~= w``.

    Example:
        >>> q, scale = quantize_rows(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
        >>> q.float().tolist(), scale.flatten().tolist()
        ([[224.0, -448.0], [0.0, 0.0]], [0.004464285913854837, 1.0])
    """
    amax = w.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_supported(x: torch.Tensor, out_features: int) -> bool:
    """A real FP8 matmul (``torch._scaled_mm``) may run here: CUDA with compute capability 8.9
    or newer, dims it accepts (multiples of 16), and some rows."""
    if not x.is_cuda or x.numel() == 0:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9) and x.shape[-1] % 16 == 0 and out_features % 16 == 0


_PROBED: dict[tuple, bool] = {}


def _path_works(kind: str, device: torch.device) -> bool:
    """Whether this torch build runs the ``row`` or ``block`` scaled FP8 matmul correctly on
    ``device``: tried once on a small product against the dequantized one. Older builds raise
    ("Invalid scaling configuration") or, for some block shapes, return wrong numbers."""
    key = (kind, device)
    if key not in _PROBED:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(8, 512, device=device, generator=gen)
        w = torch.randn(128, 512, device=device, generator=gen) * 0.05
        try:
            if kind == "row":
                q, scale = quantize_rows(w)
                got, ref = fp8_linear(x, q, scale[:, 0], None, None), x @ (q.float() * scale).t()
            else:
                blocks = w.view(1, 128, 4, 128)
                scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
                q = (blocks / scale[:, None, :, None]).to(FP8).view(128, 512)
                got = fp8_block_linear(x, q, scale, None)
                ref = x @ (q.float().view(1, 128, 4, 128) * scale[:, None, :, None]).view(128, 512).t()
            _PROBED[key] = bool(((got.float() - ref).abs().max() / ref.abs().max()) < 0.1)
        except RuntimeError:
            _PROBED[key] = False
    return _PROBED[key]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` through ``torch._scaled_mm``: activations quantized per token (or with the
    static ``input_scale``), weights scaled per output row; output in bf16, then ``x``'s dtype."""
    k = x.shape[-1]
    flat = x.reshape(-1, k).float()
    if input_scale is None:
        xs = flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    else:
        xs = input_scale.float().reshape(1, 1).expand(flat.shape[0], 1).contiguous()
    xq = (flat / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=row_scale.float().reshape(1, -1).contiguous(),
                         out_dtype=torch.bfloat16)
    y = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` through ``torch._scaled_mm`` with DeepSeek-style scales: activations
    quantized per token and 128 columns, weights per 128 x 128 block (Hopper, CUDA 12.9+;
    ``K`` a multiple of 512, see ``SerializedFP8.block_scales``)."""
    k, m = x.shape[-1], x[..., 0].numel()
    flat = x.reshape(m, k).float()
    flat = F.pad(flat, (0, 0, 0, -m % 4))  # cuBLASLt wants rows in multiples of 4
    groups = flat.view(flat.shape[0], k // 128, 128)
    xs = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    xq = (groups / xs[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(flat.shape[0], k)
    # both scales outer-dim-major: [M, K/128] column-major, [K/128, N/128] as the weight's transpose
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs.t().contiguous().t(),
                         scale_b=block_scale.float().contiguous().t(), out_dtype=torch.bfloat16)
    y = y[:m].to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y
