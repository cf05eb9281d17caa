"""int4 weights on CUDA through ``torch._weight_int4pack_mm`` (bf16 activations, sm80+).

torch's kernel has its own packing and zero convention: ``torch._convert_weight_to_int4pack``
takes ``[N, K / 2]`` uint8 with the even column in the high nibble, and each group's
``(scale, zero)`` pair dequantizes ``w = (q - 8) * scale + zero``. An integer zero point ``z``
(``w = s (q - z)``) is the pair ``(s, s (8 - z))``, held in bf16: the kernel's result differs
from the float32 dequantization by bf16 rounding, never by a convention. Whether this torch
build runs it correctly is tried once per device, on a small product against the dequantized
one; where it does not, or the shapes do not fit, the caller dequantizes instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_GROUPS = (256, 128, 64, 32)
"""group sizes the kernel takes; a larger group is split into the largest of these dividing it"""
PROBE_TOLERANCE = 0.05
"""max |kernel - dequantized| / max |dequantized| the probe accepts (bf16 rounding is ~0.01)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Int4Weight:
    """A weight in the kernel's layout, made once per layer and device."""

    packed: torch.Tensor
    """``torch._convert_weight_to_int4pack`` of the values"""
    scales_zeros: torch.Tensor
    """``[K / group, N, 2]`` bf16 (scale, zero) pairs"""
    group: int
    """the kernel's group size"""
    out_features: int
    """N"""


def kernel_group(group: int, k: int) -> int | None:
    """The kernel group size for a format's group of ``group`` columns (``k`` in all); None: none fits."""
    return next((g for g in KERNEL_GROUPS if group % g == 0 and k % g == 0), None)


def inner_k_tiles(k: int) -> int | None:
    """The largest ``innerKTiles`` (8, 4 or 2) whose tiles of 16 columns divide ``k``."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def pack_int4(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int) -> Int4Weight | None:
    """The kernel's form of ``w = scale[g] (q - zero[g])``, or None when the shapes do not fit it.

    Args:
        q: ``[N, K]`` unsigned values in [0, 15], on the CUDA device.
        zero: ``[N, K / group]`` unsigned integer zero points.
        scale: ``[N, K / group]`` scales.
        group: columns per group, consecutive.
    """
    n, k = q.shape
    g, tiles = kernel_group(group, k), inner_k_tiles(k)
    if g is None or tiles is None or n % 8:
        return None
    q = q.to(torch.int32)
    nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    s = scale.float().repeat_interleave(group // g, dim=1)
    z = zero.float().repeat_interleave(group // g, dim=1)
    pairs = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(packed=torch._convert_weight_to_int4pack(nibbles, tiles), scales_zeros=pairs, group=g,
                      out_features=n)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` through ``torch._weight_int4pack_mm``: activations in bf16, output in ``x``'s dtype."""
    k = x.shape[-1]
    y = torch._weight_int4pack_mm(x.reshape(-1, k).to(torch.bfloat16).contiguous(), w.packed, w.group,
                                  w.scales_zeros)
    y = y.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
    return y + bias if bias is not None else y


_PROBED: dict[torch.device, bool] = {}


def kernel_works(device: torch.device) -> bool:
    """Whether ``torch._weight_int4pack_mm`` runs here and agrees with the dequantized product:
    CUDA with compute capability 8.0 or newer, tried once per device."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if device not in _PROBED:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randint(0, 16, (128, 512), device=device, generator=gen, dtype=torch.int32)
        zero = torch.randint(0, 16, (128, 4), device=device, generator=gen, dtype=torch.int32)
        scale = torch.rand(128, 4, device=device, generator=gen) * 0.01 + 0.001
        x = torch.randn(8, 512, device=device, generator=gen)
        ref = x @ (scale.repeat_interleave(128, 1) * (q - zero.repeat_interleave(128, 1)).float()).t()
        try:
            w = pack_int4(q, zero, scale, 128)
            got = int4_linear(x, w, None).float()
            _PROBED[device] = bool(((got - ref).abs().max() / ref.abs().max()) < PROBE_TOLERANCE)
        except RuntimeError:
            _PROBED[device] = False
    return _PROBED[device]
