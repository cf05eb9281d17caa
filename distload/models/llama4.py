"""Llama 4's text model (``llama4_text``): GQA attention with rope on most layers and none on the
others (``no_rope_layers``), rope layers attending within chunks of ``attention_chunk_size`` and
L2-normalizing q and k (``use_qk_norm``), NoPE layers scaling q by position (temperature tuning);
a mixture of experts every ``interleave_moe_layer_step``-th layer (or the ``moe_layers`` named),
dense MLPs of ``intermediate_size_mlp`` in the others.

A MoE layer's experts are packed into ``feed_forward.experts.gate_up_proj`` ``[E, hidden, 2 I]``
(gate and up the two halves of the last dim) and ``down_proj`` ``[E, I, hidden]``; the router
(``feed_forward.router``) scores its top-k logits with a sigmoid, each chosen expert gets the
token scaled by its score, and an ungated ``shared_expert`` of width ``intermediate_size`` is
added. Each expert's gate and up are regions of their own (``layers.packed_moe``), a unit per
expert per part per TP shard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..experts import ExpertFacts
from ..layers.packed_moe import TopKRouter, silu_glu
from .arch import Architecture, BuildContext
from .config import DecoderConfig, DecoderTraits
from .fields import MAX_SIZE, MAX_VALUES, Fields
from .llama import Attention, DecoderForCausalLM
from .moe import DenseFFN, SparseMoE, expert_count, expert_exchange, packed_experts
from .rope import rotate_pairs

ATTENTION_TYPES = ("full_attention", "chunked_attention")
"""the attention kinds of Llama 4's ``layer_types``"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Temperature:
    """NoPE layers' query scaling ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``."""

    floor_scale: float
    """positions per step of the scale"""
    attn_scale: float
    """growth per step"""

    def scales(self, seq_len: int, device) -> torch.Tensor:
        """The scale of each position ``[seq_len]`` (float32)."""
        pos = torch.arange(seq_len, device=device).float()
        return torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Llama4Config:
    """A Llama 4 text config.json."""

    decoder: DecoderConfig
    """attention, norms, embedding, head; ``intermediate_size`` is an expert's (and the shared expert's)"""
    num_experts: int
    """experts of a MoE layer"""
    top_k: int
    """experts per token"""
    dense_intermediate: int
    """width of the dense layers' MLP (``intermediate_size_mlp``)"""
    moe_layers: frozenset[int]
    """layers with experts"""
    rope_layers: tuple[bool, ...]
    """per layer: rope (else NoPE)"""
    chunks: tuple[int | None, ...]
    """per layer: the attention chunk (None: full causal attention)"""
    qk_norm: bool
    """L2-normalize q and k in rope layers"""
    temperature: Temperature | None
    """NoPE layers' query scaling; None: off"""

    def expert_facts(self) -> ExpertFacts:
        """The experts an expert map is checked against."""
        return ExpertFacts(num_experts=self.num_experts, num_layers=self.decoder.num_hidden_layers,
                           sparse_layers=self.moe_layers)


def read_llama4(config: Mapping, arch: Architecture) -> Llama4Config:
    """Reads a Llama 4 text config.json as transformers' Llama4TextConfig does.

    Raises:
        ConfigError: naming the field and its value.
    """
    f = Fields(config)
    decoder = DecoderConfig.from_json(config, arch.decoder, default_theta=500000.0)
    bias = f.flag("attention_bias", False)
    decoder = dataclasses.replace(decoder, attention_bias=bias, o_bias=bias)
    layers, hidden, inter = decoder.num_hidden_layers, decoder.hidden_size, decoder.intermediate_size
    experts = expert_count(f, arch.expert_keys)
    f.at_most(f"{arch.expert_keys[0]} * intermediate_size * hidden_size", experts * inter * hidden, MAX_VALUES)
    step = f.integer("interleave_moe_layer_step", 1)
    moe = f.integers("moe_layers", tuple(range(step - 1, layers, step)), maximum=layers - 1, what="layer indices",
                     nullable=True)
    interval = f.integer("no_rope_layer_interval", 4)
    flags = f.integers("no_rope_layers", (), maximum=1, what="flags (1: rope, 0: none)", nullable=True) or \
        tuple(int((i + 1) % interval != 0) for i in range(layers))
    if len(flags) < layers:
        raise ConfigError(f"config.json no_rope_layers must have a flag for each of the {layers} layers, "
                          f"got {len(flags)}")
    rope = tuple(bool(flag) for flag in flags[:layers])
    chunk = None if config.get("attention_chunk_size", 8192) is None else f.integer("attention_chunk_size", 8192)
    default = tuple("chunked_attention" if r and chunk is not None else "full_attention" for r in rope)
    types = f.strings("layer_types", default, length=layers, choices=ATTENTION_TYPES, nullable=True)
    if "chunked_attention" in types and chunk is None:
        raise f.error("attention_chunk_size", "a positive integer when layer_types has chunked_attention", chunk)
    tuning = f.flag("attn_temperature_tuning", True)
    temperature = Temperature(floor_scale=f.number("floor_scale", 8192.0),
                              attn_scale=f.number("attn_scale", 0.1, positive=False)) if tuning else None
    return Llama4Config(decoder=decoder, num_experts=experts, top_k=f.integer("num_experts_per_tok", 1,
                                                                               maximum=experts),
                        dense_intermediate=f.integer("intermediate_size_mlp", 16384, cap=MAX_SIZE),
                        moe_layers=frozenset(moe), rope_layers=rope,
                        chunks=tuple(chunk if t == "chunked_attention" else None for t in types),
                        qk_norm=f.flag("use_qk_norm", True), temperature=temperature)


class Llama4Attention(Attention):
    """Llama 4 attention: rope on adjacent channel pairs (rope layers), then q and k L2-normalized
    (rope layers, with ``use_qk_norm``), q scaled by position (NoPE layers, temperature tuning);
    attention within chunks (chunked layers) or over every earlier position."""

    def __init__(self, cfg: Llama4Config, layer: int, **kwargs) -> None:
        super().__init__(cfg.decoder, layer, **kwargs)
        self.rope, self.chunk = cfg.rope_layers[layer], cfg.chunks[layer]
        self.l2 = cfg.qk_norm and self.rope
        self.temperature = None if self.rope else cfg.temperature
        self.eps = cfg.decoder.rms_norm_eps

    def _l2(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def position(self, q, k, cos, sin):
        if self.rope:
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        if self.l2:
            q, k = self._l2(q), self._l2(k)
        if self.temperature is not None:
            q = (q * self.temperature.scales(q.shape[2], q.device)[:, None]).to(q.dtype)
        return q, k

    def allowed(self, s: int, device) -> torch.Tensor:
        allowed = super().allowed(s, device)
        if self.chunk is not None:
            i = torch.arange(s, device=device) // self.chunk
            allowed &= i[:, None] == i[None, :]
        return allowed


def build_llama4(cfg: Llama4Config, ctx: BuildContext) -> DecoderForCausalLM:
    """The reference Llama 4 text model of this rank (its stage, its expert group), its experts
    placed as ``ctx.experts`` says."""
    dec, exchange = cfg.decoder, expert_exchange(ctx)
    tp, ops, dtype, device = ctx.tp, ctx.ops, ctx.dtype, ctx.device
    h = dec.hidden_size

    def ffn(layer: int) -> tuple[str, nn.Module]:
        if layer not in cfg.moe_layers:
            return "feed_forward", DenseFFN(h, cfg.dense_intermediate, tp=tp, ops=ops, dtype=dtype, device=device)
        router = TopKRouter(cfg.num_experts, h, top_k=cfg.top_k, bias=False, sigmoid=True, dtype=dtype,
                            device=device)
        experts = packed_experts(ctx, layer, hidden=h, intermediate=dec.intermediate_size, interleaved=False,
                                 glu=silu_glu, weight_inputs=True)
        shared = ("shared_expert", DenseFFN(h, dec.intermediate_size, tp=tp, ops=ops, dtype=dtype, device=device))
        return "feed_forward", SparseMoE(router, experts, exchange, shared=shared, router_name="router")

    return DecoderForCausalLM(dec, tp=tp, tp_rank=ctx.tp_rank, ops=ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(dec.num_hidden_layers, ctx.stage),
                              attention=lambda i: Llama4Attention(cfg, i, tp=tp, ops=ops, dtype=dtype, device=device),
                              mlp=ffn, dtype=dtype, device=device)


# no biases unless attention_bias; rope default or llama3 (read by DecoderConfig); chunks, not windows
LLAMA4_TEXT = Architecture(model_type="llama4_text", decoder=DecoderTraits(qkv_bias=None, o_bias=True),
                           read=read_llama4, build=build_llama4, experts=Llama4Config.expert_facts,
                           expert_keys=("num_local_experts",))
