"""gpt-oss (``gpt_oss``), the bf16 checkpoints: GQA attention with biases and a learned sink logit
per head, sliding and full attention layers (alternating by default), ``yarn`` rope, and a mixture
of experts in every layer, its experts packed per layer into ``mlp.experts.gate_up_proj``
``[E, hidden, 2 I]`` (gate and up interleaved along the last dim), ``down_proj`` ``[E, I, hidden]``
and their biases, routed by ``mlp.router`` (weight and bias) with a softmax over the top-k logits.

Each expert's gate/up TP shard is one contiguous column range of its region of ``gate_up_proj``
(``layers.packed_moe``); an EP rank reads only its experts' regions. The MXFP4 checkpoints store
the expert matrices as ``*_blocks`` / ``*_scales`` (``quant.mxfp4``), split on whole blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..experts import ExpertFacts
from ..layers.packed_moe import TopKRouter
from ..spec import ParamSpec, Shard, Source
from .arch import Architecture, BuildContext
from .config import LAYER_TYPES, DecoderConfig, DecoderTraits, read_rope
from .fields import MAX_VALUES, Fields
from .llama import Attention, DecoderForCausalLM
from .moe import SparseMoE, expert_count, expert_exchange, packed_experts
from .rope import Yarn, default_inv_freq, read_yarn

DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
"""the rope transformers' GptOssConfig gives a config.json that names none"""


def alternating_windows(f: Fields, layers: int) -> tuple[int | None, ...]:
    """``sliding_window`` in the layers ``layer_types`` marks sliding (default: the even ones);
    a null window is full attention."""
    window = None if f.values.get("sliding_window", 128) is None else f.integer("sliding_window", 128)
    default = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    types = f.strings("layer_types", default, length=layers, choices=LAYER_TYPES, nullable=True)
    return tuple(window if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True, kw_only=True, slots=True)
class GptOssConfig:
    """A gpt-oss config.json: the decoder fields, its experts and its rope."""

    decoder: DecoderConfig
    """attention (biases on q/k/v/o by default), norms, embedding, head; ``intermediate_size`` is an expert's"""
    num_experts: int
    """experts per layer"""
    top_k: int
    """experts per token"""
    swiglu_alpha: float
    """sigmoid gain of the experts' clamped SwiGLU"""
    swiglu_limit: float
    """clamp of gate (above) and up (both sides)"""
    yarn: Yarn | None
    """yarn parameters; None: the default rope"""

    def rotary(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """The inverse frequencies (float32) and the cos/sin scale."""
        dec = self.decoder
        if self.yarn is None:
            return default_inv_freq(dec.head_dim, dec.rope_theta), 1.0
        return self.yarn.inv_freq(dec.head_dim, dec.rope_theta), self.yarn.attention_factor

    def expert_facts(self) -> ExpertFacts:
        """Every layer has experts."""
        layers = self.decoder.num_hidden_layers
        return ExpertFacts(num_experts=self.num_experts, num_layers=layers, sparse_layers=frozenset(range(layers)))

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``(clamp(up) + 1) * gate * sigmoid(alpha * gate)``, gate clamped above."""
        gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha))


def read_gpt_oss(config: Mapping, arch: Architecture) -> GptOssConfig:
    """Reads a gpt-oss config.json as transformers' GptOssConfig does.

    Raises:
        ConfigError: naming the field and its value.
    """
    f = Fields(config)
    _, rope_type, params = read_rope(f)
    if params is None and "rope_parameters" not in config and "rope_scaling" not in config:
        rope_type, params = "yarn", Fields(DEFAULT_YARN, prefix="rope_parameters.", needed_by="rope_type 'yarn'")
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"config.json rope_type {rope_type!r} is not supported for gpt_oss "
                          "(supported: default, yarn)")
    decoder = DecoderConfig.from_json(config, arch.decoder, default_rope=True, default_theta=150000.0)
    bias = f.flag("attention_bias", True)  # GptOssConfig's default
    decoder = dataclasses.replace(decoder, attention_bias=bias, o_bias=bias)
    experts = expert_count(f, arch.expert_keys)
    f.at_most(f"{arch.expert_keys[0]} * intermediate_size * hidden_size",
              experts * decoder.intermediate_size * decoder.hidden_size, MAX_VALUES)
    return GptOssConfig(decoder=decoder, num_experts=experts,
                        top_k=f.integer("num_experts_per_tok", 4, maximum=experts),
                        swiglu_alpha=f.number("swiglu_alpha", 1.702), swiglu_limit=f.number("swiglu_limit", 7.0),
                        yarn=read_yarn(f, params) if rope_type == "yarn" else None)


class SinkAttention(Attention):
    """gpt-oss attention: a learned logit per head (``self_attn.sinks``, this rank's heads) joins each
    softmax and takes its share of the weight, which no value receives."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, tp: int, **kwargs) -> None:
        super().__init__(cfg, layer, tp=tp, **kwargs)
        self.tp = tp
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=kwargs.get("dtype"), device=kwargs.get("device")))

    def param_specs(self, path: str):
        yield from super().param_specs(path)  # the KV-cache scales, when the cache is FP8
        name, heads = f"{path}.sinks", self.num_heads * self.tp
        yield ParamSpec(name=name, shape=(self.num_heads,),
                        sources=(Source(name=name, shape=(heads,), shard=Shard(dim=0, num_shards=self.tp)),))

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = scores.shape
        sinks = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(b, -1, s, 1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return torch.softmax(logits, dim=-1)[..., :-1]


def build_gpt_oss(cfg: GptOssConfig, ctx: BuildContext) -> DecoderForCausalLM:
    """The reference gpt-oss model of this rank (its stage, its expert group), its experts placed
    as ``ctx.experts`` says."""
    dec, exchange = cfg.decoder, expert_exchange(ctx)
    common = dict(tp=ctx.tp, ops=ctx.ops, dtype=ctx.dtype, device=ctx.device)

    def ffn(layer: int) -> tuple[str, nn.Module]:
        h = dec.hidden_size
        router = TopKRouter(cfg.num_experts, h, top_k=cfg.top_k, bias=True, sigmoid=False, dtype=ctx.dtype,
                            device=ctx.device)
        experts = packed_experts(ctx, layer, hidden=h, intermediate=dec.intermediate_size, interleaved=True,
                                 glu=cfg.glu, bias=True, path=f"model.layers.{layer}.mlp.experts")
        return "mlp", SparseMoE(router, experts, exchange, router_name="router")

    return DecoderForCausalLM(dec, tp=ctx.tp, tp_rank=ctx.tp_rank, ops=ctx.ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(dec.num_hidden_layers, ctx.stage),
                              attention=lambda i: SinkAttention(dec, i, **common), mlp=ffn, rotary=cfg.rotary,
                              dtype=ctx.dtype, device=ctx.device)


# transformers' attribute_map lets the expert count be named either way
GPT_OSS = Architecture(model_type="gpt_oss", decoder=DecoderTraits(qkv_bias=None, o_bias=True,
                                                                   windows=alternating_windows),
                       read=read_gpt_oss, build=build_gpt_oss, experts=GptOssConfig.expert_facts,
                       expert_keys=("num_local_experts", "num_experts"))
