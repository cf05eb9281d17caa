"""Typed view of a dense decoder's config.json (Llama family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..errors import ConfigError
from ..jsondoc import quoted
from .fields import MAX_SIZE, Fields

ROPE_TYPES = ("default", "llama3")

WindowRule = Callable[[Fields, int], "tuple[int | None, ...]"]
"""(the config's fields, its layer count) -> each layer's attention window (None: full causal)"""


def no_windows(f: Fields, layers: int) -> tuple[int | None, ...]:
    """Full causal attention in every layer (llama)."""
    return (None,) * layers


def every_layer_window(f: Fields, layers: int) -> tuple[int | None, ...]:
    """``sliding_window`` (null: none) in every layer (mistral)."""
    return (f.integer("sliding_window", None, nullable=True),) * layers


LAYER_TYPES = ("full_attention", "sliding_attention")
"""the attention kinds of qwen2 / qwen3 ``layer_types``"""


def layer_type_windows(f: Fields, layers: int) -> tuple[int | None, ...]:
    """``sliding_window`` in the layers ``layer_types`` marks sliding, when ``use_sliding_window``
    is true (qwen2, qwen3; qwen2_moe writes sliding_window 0 when it is off)."""
    on = f.flag("use_sliding_window", False)
    window = f.integer("sliding_window", None, minimum=0, nullable=True)
    types = f.strings("layer_types", ("full_attention",) * layers, length=layers, choices=LAYER_TYPES,
                      nullable=True)
    if on and "sliding_attention" in types and not window:
        raise f.error("sliding_window", "a positive integer when use_sliding_window is true", window)
    return tuple(window if on and t == "sliding_attention" else None for t in types)


@dataclass(frozen=True, kw_only=True, slots=True)
class DecoderTraits:
    """What one model type's transformers class fixes about its attention and MLP."""

    qkv_bias: bool | None
    """q/k/v projections have biases (True / False: always / never; None: config.json attention_bias)"""
    o_bias: bool = False
    """o_proj has a bias whenever q/k/v have"""
    mlp_bias: bool = False
    """config.json mlp_bias gives the MLP projections biases"""
    qk_norm: bool = False
    """per-head RMS norm on q and k"""
    windows: WindowRule = no_windows
    """each layer's attention window"""


@dataclass(frozen=True, kw_only=True, slots=True)
class DecoderConfig:
    """The config.json fields a Llama-family decoder needs."""

    model_type: str
    """config.json's ``model_type``"""
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
    def from_json(cls, cfg: Mapping, traits: DecoderTraits, *, head_dim: int | None = None,
                  default_rope: bool = False, default_theta: float = 10000.0) -> "DecoderConfig":
        """Reads a Hugging Face config.json dict, every field type- and range-checked.

        Args:
            cfg: the parsed config.json.
            traits: what its model type fixes (an ``Architecture``'s ``decoder``).
            head_dim: the rotary width where the config names it otherwise (DeepSeek-V3).
            default_rope: the default rotary embedding at the config's ``rope_theta``, whatever
                ``rope_type`` says (a model type that reads its other rope kinds itself).
            default_theta: ``rope_theta`` when config.json gives none (its transformers class's).

        Raises:
            ConfigError: naming the field and its value (the caller adds the file).
        """
        f = Fields(cfg)
        model_type = f.text("model_type")
        layers = f.integer("num_hidden_layers")
        hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
        kv_heads = f.integer("num_key_value_heads", heads, nullable=True)
        if heads % kv_heads:
            raise ConfigError(f"config.json num_key_value_heads must divide num_attention_heads ({heads}), "
                              f"got {kv_heads}")
        derived = ""
        if head_dim is None:
            head_dim = f.integer("head_dim", None, nullable=True)
        if head_dim is None:  # transformers' default
            head_dim, derived = hidden // heads, " (hidden_size // num_attention_heads)"
            if not head_dim:
                raise ConfigError(f"config.json num_attention_heads ({heads}) must not exceed hidden_size "
                                  f"({hidden}) when head_dim is not given")
        if head_dim % 2:  # the rotary embedding turns pairs of channels
            raise ConfigError(f"config.json head_dim must be even, got {head_dim}{derived}")
        f.at_most("num_attention_heads * head_dim", heads * head_dim, MAX_SIZE)
        theta, rope_type, scaling = read_rope(f, default_theta=default_theta)
        if default_rope:
            rope_type, scaling = "default", None
        elif rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json rope_type {quoted(rope_type)} is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")
        act = f.text("hidden_act", "silu", choices=("silu",))
        bias = f.flag("attention_bias", False) if traits.qkv_bias is None else traits.qkv_bias
        return cls(
            model_type=model_type, vocab_size=f.integer("vocab_size"), hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=f.number("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=_llama3(scaling) if rope_type == "llama3" else None,
            tie_word_embeddings=f.flag("tie_word_embeddings", False),
            attention_bias=bias, o_bias=bias and traits.o_bias,
            mlp_bias=traits.mlp_bias and f.flag("mlp_bias", False), qk_norm=traits.qk_norm,
            sliding_windows=traits.windows(f, layers), hidden_act=act)


def read_rope(f: Fields, *, default_theta: float = 10000.0) -> tuple[float, str, Fields | None]:
    """``(rope_theta, rope_type, the fields of its parameters)``, from ``rope_parameters``
    (transformers 5) or else ``rope_scaling`` and ``rope_theta`` (4.x); ``default_theta`` when
    neither names the base."""
    params = f.section("rope_parameters", needed_by="rope_parameters")
    if params is None:
        params = f.section("rope_scaling", needed_by="rope_scaling")
        theta = f.number("rope_theta", default_theta)
    else:
        theta = default_theta
    if params is None:
        return theta, "default", None
    kind = params.text("rope_type", params.text("type", "default"))  # "type": the 4.x name
    return params.number("rope_theta", theta), kind, params


def _llama3(params: Fields) -> dict[str, float]:
    """The llama3 frequency-scaling parameters, checked as transformers checks them."""
    params = Fields(params.values, prefix=params.prefix, needed_by="rope_type 'llama3'")
    low, high = params.number("low_freq_factor", 1.0), params.number("high_freq_factor", 4.0)
    if high <= low:
        raise params.error("high_freq_factor", f"greater than low_freq_factor ({low})", high)
    return {"rope_type": "llama3", "factor": params.number("factor"), "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": params.number("original_max_position_embeddings")}
