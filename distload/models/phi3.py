"""Phi-3 (``phi3``): a Llama-like decoder whose checkpoint stores ``self_attn.qkv_proj`` and
``mlp.gate_up_proj`` fused ([q | k | v] and [gate | up] rows); its column-parallel layers take
their parts as regions of those tensors. Rope: default, or ``longrope`` (short / long factors
picked by sequence length, cos and sin scaled by the attention factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import ConfigError
from .arch import Architecture, BuildContext
from .config import DecoderConfig, DecoderTraits, every_layer_window, read_rope
from .fields import Fields
from .llama import MLP, Attention, DecoderForCausalLM

LONGROPE_NAMES = ("longrope", "su", "yarn")
"""rope types transformers' Phi3Config reads as longrope (``su`` and ``yarn`` are its old names)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class LongRope:
    """Phi-3's longrope parameters (transformers' ``_compute_longrope_parameters``)."""

    short_factor: tuple[float, ...]
    """per-frequency divisors up to ``original_max_position_embeddings`` tokens"""
    long_factor: tuple[float, ...]
    """per-frequency divisors for longer sequences"""
    original_max_position_embeddings: int
    """the pretraining context: sequences longer than it take the long factors"""
    attention_factor: float
    """scale of cos and sin (given, or sqrt(1 + ln factor / ln original) when factor > 1)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Phi3Config:
    """A Phi-3 config.json: the decoder fields and its rope."""

    decoder: DecoderConfig
    """the Llama-family fields (no biases; sliding window in every layer when set)"""
    longrope: LongRope | None
    """longrope parameters; None: the default rope at ``decoder.rope_theta``"""

    def rotary(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """The inverse frequencies (float32) and the cos/sin scale for a sequence of ``seq_len``."""
        hd = self.decoder.head_dim
        exponents = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
        base = self.decoder.rope_theta ** exponents
        rope = self.longrope
        if rope is None:
            return 1.0 / base, 1.0
        long = seq_len > rope.original_max_position_embeddings
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * base), rope.attention_factor


def _factors(p: Fields, key: str, length: int) -> tuple[float, ...]:
    values = p.values.get(key)
    if values is None:
        raise p.absent(key)
    if not isinstance(values, list) or len(values) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise p.error(key, f"a list of {length} positive numbers (head_dim / 2)", values)
    return tuple(float(v) for v in values)


def read_phi3(config: Mapping, arch: Architecture) -> Phi3Config:
    """Reads a Phi-3 config.json as transformers' Phi3Config does.

    Raises:
        ConfigError: naming the field and its value.
    """
    f = Fields(config)
    _, rope_type, params = read_rope(f)
    if rope_type not in ("default", *LONGROPE_NAMES):
        raise ConfigError(f"config.json rope_type {rope_type!r} is not supported for phi3 "
                          "(supported: default, longrope)")
    decoder = DecoderConfig.from_json(config, arch.decoder, default_rope=True)
    partial = (params or f).number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"config.json partial_rotary_factor must be 1.0 for phi3 (partial rotary "
                          f"embeddings are not supported yet), got {partial}")
    if rope_type == "default":
        return Phi3Config(decoder=decoder, longrope=None)
    p = Fields(params.values, prefix=params.prefix, needed_by="rope_type 'longrope'")
    key = "original_max_position_embeddings"
    original = p.integer(key, f.integer(key, 4096))
    # null factors are absent ones, as transformers reads them
    factor = p.number("factor") if p.values.get("factor") is not None else \
        f.integer("max_position_embeddings", 4096) / original
    if p.values.get("attention_factor") is not None:
        attention = p.number("attention_factor")
    elif factor <= 1.0:
        attention = 1.0
    elif original == 1:  # ln 1 = 0 divides the derived factor (transformers fails with ZeroDivisionError)
        raise (p if key in p.values else f).error(key, "at least 2 when longrope derives its attention factor "
                                                  "from it (sqrt(1 + ln factor / ln original))", original)
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original))
    half = decoder.head_dim // 2
    return Phi3Config(decoder=decoder, longrope=LongRope(
        short_factor=_factors(p, "short_factor", half), long_factor=_factors(p, "long_factor", half),
        original_max_position_embeddings=original, attention_factor=attention))


def build_phi3(cfg: Phi3Config, ctx: BuildContext) -> DecoderForCausalLM:
    """The reference Phi-3 decoder of this rank: Llama's, with q/k/v and gate/up read as regions
    of the fused checkpoint tensors, and its own rope."""
    dec = cfg.decoder
    common = dict(tp=ctx.tp, ops=ctx.ops, dtype=ctx.dtype, device=ctx.device, fused_on_disk=True)
    return DecoderForCausalLM(dec, tp=ctx.tp, tp_rank=ctx.tp_rank, ops=ctx.ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(dec.num_hidden_layers, ctx.stage),
                              attention=lambda i: Attention(dec, i, **common),
                              mlp=lambda i: ("mlp", MLP(dec, **common)),
                              rotary=cfg.rotary, dtype=ctx.dtype, device=ctx.device)


# transformers' Phi3 has no biases; its sliding window (when set) is in every layer
PHI3 = Architecture(model_type="phi3", decoder=DecoderTraits(qkv_bias=False, windows=every_layer_window),
                    read=read_phi3, build=build_phi3)
