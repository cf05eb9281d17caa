"""Typed view of a dense decoder's config.json (Llama family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import ConfigError

ROPE_TYPES = ("default", "llama3")
BASE_TYPES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
"""MoE model types whose attention and norms follow a dense type"""


@dataclass(frozen=True, kw_only=True, slots=True)
class DecoderConfig:
    """The config.json fields a Llama-family decoder needs."""

    model_type: str
    """``llama``, ``mistral``, ``qwen2`` or ``qwen3``"""
    vocab_size: int
    """rows of the embedding"""
    hidden_size: int
    """model width"""
    intermediate_size: int
    """MLP width"""
    num_hidden_layers: int
    """decoder layers"""
    num_attention_heads: int
    """query heads"""
    num_key_value_heads: int
    """key/value heads (GQA)"""
    head_dim: int
    """width of one head"""
    rms_norm_eps: float
    """norm epsilon"""
    rope_theta: float
    """rotary base"""
    rope_scaling: Mapping | None
    """llama3 frequency scaling parameters, or None"""
    tie_word_embeddings: bool
    """LM head shares the embedding"""
    attention_bias: bool
    """q/k/v (and for llama o) projections have biases"""
    o_bias: bool
    """the output projection has a bias"""
    mlp_bias: bool
    """MLP projections have biases"""
    qk_norm: bool
    """per-head RMS norm on q and k (qwen3)"""
    sliding_windows: tuple[int | None, ...]
    """attention window per layer; None: full causal attention"""
    hidden_act: str
    """MLP activation (silu)"""

    @classmethod
    def from_json(cls, cfg: Mapping) -> "DecoderConfig":
        """Reads a Hugging Face config.json dict; raises ConfigError naming a bad field."""
        mt = BASE_TYPES.get(cfg.get("model_type"), cfg.get("model_type"))  # MoE models share attention
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            rope = dict(cfg.get("rope_parameters") or {})
            if not rope:  # transformers 4.x keys
                rope = dict(cfg.get("rope_scaling") or {})
                rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
                rope.setdefault("rope_type", rope.get("type", "default"))
            rope_type = rope.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"config.json rope_type {rope_type!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
            window = cfg.get("sliding_window")
            if mt == "mistral":
                windows = tuple(window for _ in range(layers))
            else:  # qwen2 / qwen3: only layers marked sliding, and only if enabled
                types = cfg.get("layer_types") or ["full_attention"] * layers
                on = bool(cfg.get("use_sliding_window", False))
                windows = tuple(window if (on and t == "sliding_attention") else None for t in types)
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"config.json hidden_act {act!r} is not supported (supported: silu)")
            # which projections have biases follows each transformers model class
            bias = {"qwen2": True, "mistral": False}.get(mt, bool(cfg.get("attention_bias", False)))
            o_bias = bias and mt in ("llama", "qwen3")
            return cls(
                model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=rope if rope_type == "llama3" else None,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bias, o_bias=o_bias,
                mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
                sliding_windows=windows, hidden_act=act)
        except KeyError as err:
            raise ConfigError(f"config.json has no {err.args[0]!r}, which model_type {mt!r} needs") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.json has a malformed value: {err}") from None
