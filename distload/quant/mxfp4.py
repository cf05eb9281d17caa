"""MXFP4 experts as gpt-oss stores them (``quant_method: mxfp4``).

Each layer's packed expert matrices are stored output-major (the opposite orientation of the
bf16 ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``), cut along their inputs into blocks
of 32 values:

* ``X_blocks`` uint8 ``[E, out, in / 32, 16]``: byte ``k`` of a block holds value ``2k`` in its low
  nibble and ``2k + 1`` in its high nibble, each an e2m1 code (``E2M1``);
* ``X_scales`` uint8 ``[E, out, in / 32]``: the block's e8m0 exponent, scale ``2^(byte - 127)``.

``gate_up_proj``'s rows keep the bf16 columns' order (gate, up, gate, up, ...); the biases,
attention, router, embeddings and head stay as stored (bf16 in the released models).

Splits: expert TP cuts gate_up's rows and down's input blocks on whole blocks of 32 intermediate
features (``feature_block``): each rank holds ``ceil(blocks / etp)``, the last ones fewer or none,
so 90 blocks (2880) load at expert TP 4 and 8 as the models are served; the layer pads its share
with zeros that are no units. Every expert's blocks and scales are that expert's boxes of the
two tensors, units of their own per shard, read only by the ranks hosting the expert.

Forward: the weight dequantized in float32 (exact), then cast to the activations' dtype, on the
CPU and on CUDA alike: torch's MXFP4 matmul (``torch._scaled_mm`` with e8m0 block scales) needs
compute capability 10.0, and the H200 is 9.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint.header import TensorInfo
from ..errors import PlanError
from .base import Declared, Follow, QuantMethod, WeightGeometry, param_attr

BLOCK = 32
"""values per e8m0 scale"""
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""the value of each 4-bit code: sign bit 3, then 2 exponent bits and 1 mantissa bit"""
STORED = ("blocks", "scales")
"""what the format stores per matrix ``X``: ``X_blocks``, ``X_scales``"""


def suffixed(suffix: str):
    """Names ``<tensor>_<suffix>`` from a matrix's ``<tensor>`` (``gate_up_proj`` -> ``gate_up_proj_blocks``)."""
    return lambda name: f"{name}_{suffix}"


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[..., rows, in / 32, 16]`` blocks and ``[..., rows, in / 32]`` scales -> ``[..., rows, in]`` float32.

    Example:
        >>> dequantize_blocks(torch.tensor([[[[0x2F] + [0] * 15]]], dtype=torch.uint8),
        ...                   torch.tensor([[[126]]], dtype=torch.uint8))[0, 0, :3].tolist()
        [-3.0, 0.5, 0.0]
    """
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # low nibble first
    values = table[codes].flatten(-2)  # [..., rows, groups, 32]
    return (values * e8m0(scales).unsqueeze(-1)).flatten(-2)  # a power of two: exact


def e8m0(scales: torch.Tensor) -> torch.Tensor:
    """``2^(s - 127)`` of uint8 ``scales`` in float32, built from its bits (byte ``s`` is the float's
    exponent field; 0 is the subnormal 2^-127), so it is exact on any device.

    Example:
        >>> e8m0(torch.tensor([0, 1, 126, 127, 130], dtype=torch.uint8)).tolist() == [2.0 ** -127, 2.0 ** -126,
        ...                                                                              0.5, 1.0, 8.0]
        True
    """
    bits = torch.where(scales > 0, scales.to(torch.int32) << 23, torch.full_like(scales, 1 << 22, dtype=torch.int32))
    return bits.view(torch.float32)


@dataclass(frozen=True, kw_only=True, slots=True)
class MXFP4(QuantMethod):
    """gpt-oss's MXFP4 experts: e2m1 values in blocks of 32 inputs with one e8m0 scale each."""

    name: str = "mxfp4 experts (e2m1 in blocks of 32, e8m0 scales), dequantized for each matmul"
    """how reports name the scheme (and the forward it runs)"""
    feature_block: int = BLOCK
    """expert TP splits the intermediate features on whole blocks, unevenly"""

    def declare(self, attr: str, g: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        if g.experts is None:
            raise PlanError(f"parameter {g.spec.name}: MXFP4 stores packed experts only")
        for seg in g.segments:  # the format has no partial block
            inputs = seg.source.shape[g.in_dim]
            if inputs % BLOCK:
                raise PlanError(f"MXFP4 stores inputs in blocks of {BLOCK}: a matrix of {inputs} inputs has a "
                                f"partial block (parameter {g.spec.name})",
                                tensor=suffixed("blocks")(g.tensor_name(seg.source)))
        rows = Follow(dim=0)
        cols = Follow(dim=1, per=BLOCK, what=f"an MXFP4 block of {BLOCK} values")
        blocks = g.companion(suffixed("blocks"), lambda o, i: (o, i // BLOCK, BLOCK // 2), out=rows, inp=cols,
                             boxes=True)
        scales = g.companion(suffixed("scales"), lambda o, i: (o, i // BLOCK), out=rows, inp=cols, boxes=True)
        return (g.declared(attr, "blocks", *blocks, torch.uint8), g.declared(attr, "scales", *scales, torch.uint8))

    def refusal(self, declared: Declared, info: TensorInfo) -> str | None:
        if info.dtype != torch.uint8:
            what = "two e2m1 values a byte" if declared.attr.endswith("_blocks") else "e8m0 exponents"
            return (f"MXFP4 {declared.attr.rpartition('_')[2]} are stored as uint8 ({what}), this tensor is "
                    f"{str(info.dtype).removeprefix('torch.')} (parameter {declared.spec.name})")
        return None

    def dequantize(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor:
        w = dequantize_blocks(getattr(layer, param_attr(attr, "blocks")), getattr(layer, param_attr(attr, "scales")))
        return w[..., :g.cols]

