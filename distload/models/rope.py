"""Rotary tables shared by several model types: the default one and ``yarn`` (gpt-oss, DeepSeek-V3),
computed as transformers' ``modeling_rope_utils`` computes them, in float32."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fields import Fields


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """The inverse frequencies ``theta ** (-2i / dim)`` of a rotary width ``dim`` (float32)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 mscale ln(factor) + 1`` (1 for a factor up to 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Yarn:
    """The ``yarn`` rope parameters (transformers' ``_compute_yarn_parameters``)."""

    factor: float
    """context extension: how much longer than the pretraining context"""
    original_max_position_embeddings: int
    """the pretraining context"""
    beta_fast: float
    """rotations above which a frequency is kept (extrapolated)"""
    beta_slow: float
    """rotations below which a frequency is divided by ``factor`` (interpolated)"""
    truncate: bool
    """round the correction range outwards to whole dims"""
    attention_factor: float
    """scale of cos and sin (given, or from factor, mscale and mscale_all_dim)"""
    mscale_all_dim: float
    """DeepSeek's softmax-scale correction (0: none)"""

    def inv_freq(self, dim: int, theta: float) -> torch.Tensor:
        """The inverse frequencies (float32) of a rotary width ``dim`` at base ``theta``."""
        pos = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolated, interpolated = 1.0 / pos, 1.0 / (self.factor * pos)

        def correction(rotations: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(theta))

        low, high = correction(self.beta_fast), correction(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp
        return interpolated * (1 - keep) + extrapolated * keep

    def softmax_scale(self) -> float:
        """The factor DeepSeek-V3 multiplies its softmax scale by: ``mscale(factor, mscale_all_dim)^2``."""
        if not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


def _optional(p: Fields, key: str, default: float, *, positive: bool = True) -> float:
    """A number that null or absence leaves at ``default`` (transformers reads these with ``or``)."""
    return default if p.values.get(key) is None else p.number(key, positive=positive)


def read_yarn(f: Fields, params: Fields) -> Yarn:
    """Reads ``yarn`` rope parameters (``params``: the rope section of config.json ``f``).

    ``original_max_position_embeddings`` comes from the section, else from config.json's top level,
    else is ``max_position_embeddings``, as transformers standardizes it.

    Raises:
        ConfigError: naming the field and its value.
    """
    p = Fields(params.values, prefix=params.prefix, needed_by="rope_type 'yarn'")
    factor = p.number("factor")
    if "original_max_position_embeddings" in p.values:
        original = p.integer("original_max_position_embeddings")
    else:
        original = f.integer("original_max_position_embeddings", None) or f.integer("max_position_embeddings")
    mscale, mscale_all = _optional(p, "mscale", 0.0, positive=False), _optional(p, "mscale_all_dim", 0.0,
                                                                                 positive=False)
    if p.values.get("attention_factor") is not None:
        attention = p.number("attention_factor")
    elif mscale and mscale_all:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention = yarn_mscale(factor)
    truncate = p.flag("truncate", True)
    return Yarn(factor=factor, original_max_position_embeddings=original, beta_fast=_optional(p, "beta_fast", 32.0),
                beta_slow=_optional(p, "beta_slow", 1.0), truncate=truncate, attention_factor=attention,
                mscale_all_dim=mscale_all)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` turned by the rotary embedding with adjacent channels as pairs ((x0, x1), (x2, x3), ...),
    as a complex product (Llama 4); ``cos`` / ``sin`` hold each frequency twice (``[..., 2 x half]``)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
