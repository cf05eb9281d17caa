"""Integer weights packed into int32 words, shared by the int formats (compressed-tensors
``pack-quantized``, GPTQ): unpacking, group dequantization in float32, and the forward that
runs ``torch._weight_int4pack_mm`` on CUDA where it applies.

A word holds ``32 / bits`` values, value ``k`` in bits ``[k * bits, (k + 1) * bits)`` (both
formats, for 4 and 8 bits). Values and zero points are unsigned here; a format that stores
them signed or offset converts before calling ``dequantize_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import QuantMethod
from .int4mm import int4_linear, kernel_works, pack_int4


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The unsigned values packed in the int32 ``words`` along ``dim``, as int32 (``32 / bits`` per word).

    Example:
        >>> unpack(torch.tensor([[0x76543210]], dtype=torch.int32), 4, dim=1).tolist()
        [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    per = 32 // bits
    dim = dim % words.dim()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    shape = [1] * (words.dim() + 1)
    shape[dim + 1] = per
    values = (words.unsqueeze(dim + 1) >> shifts.view(shape)) & ((1 << bits) - 1)
    return values.flatten(dim, dim + 1)


def dequantize_groups(q: torch.Tensor, zero: torch.Tensor | None, scale: torch.Tensor,
                      group: torch.Tensor) -> torch.Tensor:
    """``(q - zero[g]) * scale[g]`` in float32, ``g = group[c]`` the group of input column ``c``.

    Args:
        q: ``[..., rows, cols]`` integer values.
        zero: ``[..., rows, groups]`` integer zero points, or None (symmetric: zero).
        scale: ``[..., rows, groups]`` scales.
        group: ``[cols]``, or ``[..., cols]`` per matrix of a stack, the group of each column (int64).
    """
    index = group.unsqueeze(-2).expand(*q.shape)
    w = q.float() if zero is None else q.float() - zero.float().gather(-1, index)
    return w * scale.float().gather(-1, index)


def column_groups(cols: int, group_size: int | None, device) -> torch.Tensor:
    """The group of each of ``cols`` consecutive input columns (one group when ``group_size`` is None)."""
    idx = torch.arange(cols, device=device)
    return idx // group_size if group_size else torch.zeros_like(idx)


@dataclass(frozen=True, kw_only=True, slots=True)
class IntScheme(QuantMethod):
    """What int schemes share: ``bits`` per value packed in int32 words, groups of input columns,
    and the forward: int4 on CUDA through ``torch._weight_int4pack_mm`` where it applies (probed
    once per device, see ``int4mm``), else the weight dequantized in float32.

    A scheme implements ``int4_operands`` for the kernel.
    """

    bits: int
    """4 or 8"""
    group_size: int | None = None
    """input columns per scale; None: one scale for all of them (per output row)"""

    @property
    def per_word(self) -> int:
        """Values per int32 word."""
        return 32 // self.bits

    def int4_operands(self, layer, attr: str, geometry) -> tuple | None:
        """``(q [N, K] unsigned, zero [N, G] unsigned, scale [N, G], group size)`` of a 2-D weight in
        consecutive groups, or None when its columns are not in order (activation order)."""
        return None

    def apply(self, layer, attr: str, geometry, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.bits == 4 and x.is_cuda and geometry.experts is None and kernel_works(x.device):
            cache = layer.__dict__.setdefault("_int4pack", {})  # the kernel's copy, made once per device
            if (attr, x.device) not in cache:
                operands = self.int4_operands(layer, attr, geometry)
                cache[attr, x.device] = None if operands is None else pack_int4(*operands)
            packed = cache[attr, x.device]
            if packed is not None:
                return int4_linear(x, packed, bias)
        return F.linear(x, self.dequantize(layer, attr, geometry).to(x.dtype), bias)
