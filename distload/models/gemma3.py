"""Gemma 3 text (``gemma3_text``): four ``1 + weight`` RMS norms per layer, q/k norms of the same
kind, an embedding scaled by sqrt(hidden_size) in its own dtype, sliding and global layers with
rope bases of their own, attention scaled by query_pre_attn_scalar ** -0.5, a GELU (tanh) MLP,
final logits soft-capped where config.json says so, and tied embeddings by default.

The forward follows transformers' ``Gemma3ForCausalLM`` (eager attention): among other things it
reads ``attn_logit_softcapping`` but does not apply it, and neither does this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import ParallelLMHead, VocabParallelEmbedding
from ..layers.norm import OffsetRMSNorm
from .arch import Architecture, BuildContext
from .config import LAYER_TYPES, DecoderConfig, DecoderTraits
from .fields import Fields
from .llama import MLP, Attention, _rotate_half

DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True}
"""transformers' Gemma3TextConfig defaults (released text_config objects leave many fields out)"""

ROPE_KINDS = {"full_attention": ("rope_theta", 1_000_000.0), "sliding_attention": ("rope_local_base_freq", 10_000.0)}
"""layer type -> the 4.x config key of its rope base, and the base when neither format gives one"""


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerRope:
    """The rotary embedding of one kind of layer."""

    theta: float
    """rotary base"""
    factor: float
    """linear scaling: the inverse frequencies are divided by it (1.0: the default rope)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Gemma3Config:
    """A Gemma 3 text config.json: the decoder fields and what Gemma adds."""

    decoder: DecoderConfig
    """sizes, norms epsilon, biases, tied embeddings and each layer's window (None: a global layer)"""
    layer_types: tuple[str, ...]
    """``full_attention`` or ``sliding_attention``, per layer"""
    rope: Mapping[str, LayerRope]
    """layer type -> its rotary embedding"""
    query_pre_attn_scalar: float
    """attention scores are scaled by its inverse square root"""
    final_logit_softcapping: float | None
    """logits become ``cap * tanh(logits / cap)``; None: not capped"""
    bidirectional: bool
    """``use_bidirectional_attention``: no causal mask; sliding layers see ``window // 2 + 1`` either side"""

    def inv_freq(self, layer_type: str) -> torch.Tensor:
        """The inverse frequencies (float32) of one layer type, as transformers computes them."""
        hd, rope = self.decoder.head_dim, self.rope[layer_type]
        exponents = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
        return 1.0 / (rope.theta ** exponents) / rope.factor


def _layer_types(f: Fields, layers: int) -> tuple[str, ...]:
    """``layer_types``, else every ``sliding_window_pattern``-th layer global (transformers' rule)."""
    pattern = f.integer("sliding_window_pattern", f.integer("_sliding_window_pattern", 6))
    default = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    return f.strings("layer_types", default, length=layers, choices=LAYER_TYPES, nullable=True)


def gemma_windows(f: Fields, layers: int) -> tuple[int | None, ...]:
    """``sliding_window`` (default 4096) in the sliding layers, None in the global ones."""
    window = f.integer("sliding_window", 4096, nullable=True)
    return tuple(window if t == "sliding_attention" else None for t in _layer_types(f, layers))


def _rope(f: Fields) -> dict[str, LayerRope]:
    """Each layer type's rope: ``rope_parameters`` keyed by layer type (transformers 5), else
    ``rope_theta`` / ``rope_local_base_freq`` with ``rope_scaling`` for the global layers (4.x)."""
    params = f.section("rope_parameters", needed_by="rope_parameters")
    legacy = f.section("rope_scaling", needed_by="rope_scaling")
    out = {}
    for kind, (key, base) in ROPE_KINDS.items():
        section = params.section(kind, needed_by=f"rope_parameters.{kind}") if params is not None else None
        if section is None and kind == "full_attention":
            section = legacy
        theta = f.number(key, base)
        rope_type = "default"
        if section is not None:
            theta = section.number("rope_theta", theta)
            rope_type = section.text("rope_type", section.text("type", "default"))
        if rope_type not in ("default", "linear"):
            where = section.prefix if section is not None else ""
            raise ConfigError(f"config.json {where}rope_type {rope_type!r} is not supported for gemma3_text "
                              "(supported: default, linear)")
        factor = section.number("factor") if rope_type == "linear" else 1.0
        out[kind] = LayerRope(theta=theta, factor=factor)
    return out


def _optional_number(f: Fields, key: str) -> float | None:
    return None if f.values.get(key) is None else f.number(key)


def read_gemma3(config: Mapping, arch: Architecture) -> Gemma3Config:
    """Reads a Gemma 3 text config.json as transformers' Gemma3TextConfig does (its defaults for
    absent fields).

    Raises:
        ConfigError: naming the field and its value.
    """
    values = {**DEFAULTS, **{k: v for k, v in config.items() if k != "hidden_act"}}  # Gemma reads hidden_activation
    f = Fields(values)
    f.text("hidden_activation", "gelu_pytorch_tanh", choices=("gelu_pytorch_tanh",))
    decoder = DecoderConfig.from_json(values, arch.decoder, default_rope=True)
    _optional_number(f, "attn_logit_softcapping")  # checked; transformers' Gemma 3 attention does not use it
    bidirectional = f.flag("use_bidirectional_attention", False, nullable=True)
    return Gemma3Config(decoder=decoder, layer_types=_layer_types(f, decoder.num_hidden_layers), rope=_rope(f),
                        query_pre_attn_scalar=f.number("query_pre_attn_scalar", 256),
                        final_logit_softcapping=_optional_number(f, "final_logit_softcapping"),
                        bidirectional=bidirectional)


class GemmaAttention(Attention):
    """Llama's attention with Gemma's ``1 + weight`` q/k norms, scaling and (bidirectional) masks."""

    def __init__(self, cfg: Gemma3Config, layer: int, **kwargs) -> None:
        dec = cfg.decoder
        super().__init__(dec, layer, **kwargs)
        self.q_norm = OffsetRMSNorm(dec.head_dim, dec.rms_norm_eps, dtype=kwargs["dtype"], device=kwargs["device"])
        self.k_norm = OffsetRMSNorm(dec.head_dim, dec.rms_norm_eps, dtype=kwargs["dtype"], device=kwargs["device"])
        self.layer_type = cfg.layer_types[layer]
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        self.causal = not cfg.bidirectional
        if cfg.bidirectional and self.window is not None:  # transformers' exclusive bound either side
            self.window = self.window // 2 + 1

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], -1)
        q, k, v = (t.view(b, s, -1, hd).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        i = torch.arange(s, device=x.device)
        distance = i[:, None] - i[None, :]
        allowed = distance >= 0 if self.causal else torch.ones(s, s, dtype=torch.bool, device=x.device)
        if self.window is not None:
            allowed &= distance.abs() < self.window
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * hd))


class GeluMLP(MLP):
    """Gated MLP with GELU (tanh approximation), transformers' ``gelu_pytorch_tanh``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    """Norm before and after attention, and before and after the MLP."""

    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

    def __init__(self, cfg: Gemma3Config, layer: int, *, tp: int, ops, dtype, device) -> None:
        super().__init__()
        dec = cfg.decoder
        for name in self.NORMS:
            self.add_module(name, OffsetRMSNorm(dec.hidden_size, dec.rms_norm_eps, dtype=dtype, device=device))
        self.self_attn = GemmaAttention(cfg, layer, tp=tp, ops=ops, dtype=dtype, device=device)
        self.mlp = GeluMLP(dec, tp=tp, ops=ops, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaBody(nn.Module):
    """``model.*``: embedding (first stage), this stage's layers by global index, final norm (last stage)."""

    def __init__(self, cfg: Gemma3Config, layers: range, *, first: bool, last: bool, tp: int, tp_rank: int, ops,
                 dtype, device) -> None:
        super().__init__()
        dec = cfg.decoder
        if first:
            self.embed_tokens = VocabParallelEmbedding(dec.vocab_size, dec.hidden_size, tp=tp, tp_rank=tp_rank,
                                                       ops=ops, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({str(i): GemmaDecoderLayer(cfg, i, tp=tp, ops=ops, dtype=dtype, device=device)
                                     for i in layers})
        if last:
            self.norm = OffsetRMSNorm(dec.hidden_size, dec.rms_norm_eps, dtype=dtype, device=device)


class Gemma3ForCausalLM(nn.Module):
    """This rank's pipeline stage of a Gemma 3 text model, its layers split over ``tp`` ranks."""

    def __init__(self, cfg: Gemma3Config, ctx: BuildContext) -> None:
        super().__init__()
        dec = cfg.decoder
        self.config, self.pipe = cfg, ctx.pipe
        common = dict(tp=ctx.tp, ops=ctx.ops, dtype=ctx.dtype, device=ctx.device)
        self.model = GemmaBody(cfg, ctx.layout.stage_layers(dec.num_hidden_layers, ctx.stage), first=ctx.pipe.first,
                               last=ctx.pipe.last, tp_rank=ctx.tp_rank, **common)
        if ctx.pipe.last:
            shared = self.model.embed_tokens if (dec.tie_word_embeddings and ctx.pipe.first) else None
            self.lm_head = ParallelLMHead(dec.vocab_size, dec.hidden_size, tied=shared,
                                          tied_name="model.embed_tokens.weight",
                                          tied_copy=dec.tie_word_embeddings and not ctx.pipe.first, **common)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Returns logits ``[batch, seq, vocab]`` on the last pipeline stage (None on the others)."""
        b, s = input_ids.shape
        dec = self.config.decoder
        if self.pipe.first:
            x = self.model.embed_tokens(input_ids)
            # a float32 scale rounded to the embedding's dtype (bf16: sqrt(2560) is 50.5), as transformers
            x = x * torch.tensor(math.sqrt(dec.hidden_size), dtype=torch.float32).to(x.dtype)
        else:
            weight = next(self.parameters())
            x = self.pipe.recv_prev((b, s, dec.hidden_size), weight.dtype, weight.device)
        pos = torch.arange(s, device=input_ids.device, dtype=torch.float32)
        rope = {}
        for kind in set(self.config.layer_types):
            freqs = pos[:, None] * self.config.inv_freq(kind).to(input_ids.device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            rope[kind] = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for layer in self.model.layers.values():
            x = layer(x, *rope[layer.self_attn.layer_type])
        if not self.pipe.last:
            self.pipe.send_next(x)
            return None
        logits = self.lm_head(self.model.norm(x))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def build_gemma3(cfg: Gemma3Config, ctx: BuildContext) -> Gemma3ForCausalLM:
    """The reference Gemma 3 text model of this rank (its stage, its TP shard)."""
    return Gemma3ForCausalLM(cfg, ctx)


# attention_bias gives q/k/v and o biases; Gemma's own q/k norms replace the shared ones
GEMMA3_TEXT = Architecture(model_type="gemma3_text",
                           decoder=DecoderTraits(qkv_bias=None, o_bias=True, windows=gemma_windows),
                           read=read_gemma3, build=build_gemma3)
