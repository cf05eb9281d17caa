"""Llama-family dense decoders (llama, mistral, qwen2, qwen3) split over a TP group.

Module names mirror the Hugging Face checkpoint (``model.layers.N.self_attn...``)
so unfused parameters need no mapping; fused ones (``qkv_proj``, ``gate_up_proj``)
name their checkpoint siblings in their specs.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import SINGLE_STAGE, SOLO, Collectives, PipeOps
from ..errors import ConfigError, PlanError
from ..layers import ColumnParallelLinear, ParallelLMHead, Part, RMSNorm, RowParallelLinear, VocabParallelEmbedding
from ..layers.linear import shards_for
from ..quant.layer import KVCacheScales
from .arch import Architecture, BuildContext
from .config import DecoderConfig, DecoderTraits, every_layer_window, layer_type_windows


def rotary_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Returns the rotary inverse frequencies (float32), llama3-scaled when configured."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    if cfg.rope_scaling is None:
        return inv
    s = cfg.rope_scaling
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(is_mid, mid, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module, KVCacheScales):
    """Causal GQA attention with this rank's heads; KV heads replicated when tp exceeds them.

    With an FP8 KV cache it holds ``k_scale`` / ``v_scale``; the reference forward keeps no
    KV cache (it recomputes every position), so it loads and tracks them but does not use them.
    """

    def __init__(self, cfg: DecoderConfig, layer: int, *, tp: int, ops: Collectives, dtype, device,
                 fused_on_disk: bool = False) -> None:
        super().__init__()
        if cfg.num_attention_heads % tp:
            raise PlanError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by tp={tp}")
        kv_shards = shards_for(cfg.num_key_value_heads, tp, "num_key_value_heads")
        hd = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.num_key_value_heads // kv_shards
        self.head_dim = hd
        self.window = cfg.sliding_windows[layer]
        q, k, v = ("q", "k", "v") if fused_on_disk else ("q_proj", "k_proj", "v_proj")  # regions or siblings
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [
            Part(name=q, out_features=cfg.num_attention_heads * hd, num_shards=tp),
            Part(name=k, out_features=cfg.num_key_value_heads * hd, num_shards=kv_shards),
            Part(name=v, out_features=cfg.num_key_value_heads * hd, num_shards=kv_shards),
        ], tp=tp, bias=cfg.attention_bias, fused_on_disk=fused_on_disk, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, tp=tp, bias=cfg.o_bias,
                                        ops=ops, dtype=dtype, device=device)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = self.position(q, k, cos, sin)
        return self.attend(q, k, v)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q, k, v heads ``[b, heads, s, head_dim]`` (q/k normed per head when configured)."""
        b, s, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], -1)
        q, k, v = (t.view(b, s, -1, hd) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def position(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k turned by the rotary embedding (channel halves as pairs)."""
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def allowed(self, s: int, device) -> torch.Tensor:
        """``[s, s]``: which key positions each query position sees (causal, within the window)."""
        i = torch.arange(s, device=device)
        allowed = i[:, None] >= i[None, :]
        if self.window is not None:
            allowed &= (i[:, None] - i[None, :]) < self.window
        return allowed

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention weights from masked scores ``[b, heads, s, s]`` (softmax in float32)."""
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output projection of attention over ``allowed`` positions (KV heads repeated for GQA)."""
        b, _, s, hd = q.shape
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~self.allowed(s, q.device), float("-inf"))
        out = self.probabilities(scores) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * hd))


class MLP(nn.Module):
    """SiLU-gated MLP with fused gate/up (column) and down (row) projections."""

    def __init__(self, cfg: DecoderConfig, *, tp: int, ops: Collectives, dtype, device,
                 fused_on_disk: bool = False) -> None:
        super().__init__()
        if cfg.intermediate_size % tp:
            raise PlanError(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
        gate, up = ("gate", "up") if fused_on_disk else ("gate_proj", "up_proj")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [
            Part(name=gate, out_features=cfg.intermediate_size, num_shards=tp),
            Part(name=up, out_features=cfg.intermediate_size, num_shards=tp),
        ], tp=tp, bias=cfg.mlp_bias, fused_on_disk=fused_on_disk, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp=tp, bias=cfg.mlp_bias,
                                           ops=ops, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


MLPFactory = Callable[[int], "tuple[str, nn.Module]"]
"""layer index -> (the feed-forward module's checkpoint name, the module): MoE models plug in here"""


AttentionFactory = Callable[[int], nn.Module]
"""layer index -> its attention (``forward(x, cos, sin)``): DeepSeek's MLA plugs in here"""


Rotary = Callable[[int], "tuple[torch.Tensor, float]"]
"""sequence length -> (inverse frequencies, scale of cos and sin): Phi-3's longrope plugs in here"""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, *, tp: int, ops: Collectives, dtype, device,
                 mlp: MLPFactory | None = None, attention: AttentionFactory | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = attention(layer) if attention is not None else \
            Attention(cfg, layer, tp=tp, ops=ops, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        name, module = mlp(layer) if mlp is not None else ("mlp", MLP(cfg, tp=tp, ops=ops, dtype=dtype, device=device))
        self.ffn_name = name
        self.add_module(name, module)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """``model.*`` of the checkpoint: embedding (first stage), this stage's layers, final norm
    (last stage). Layers keep their global index as their name (``model.layers.5``)."""

    def __init__(self, cfg: DecoderConfig, layers: range, *, first: bool, last: bool, tp: int, tp_rank: int,
                 ops: Collectives, dtype, device, mlp: MLPFactory | None = None,
                 attention: AttentionFactory | None = None) -> None:
        super().__init__()
        if first:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=tp, tp_rank=tp_rank,
                                                       ops=ops, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, tp=tp, ops=ops, dtype=dtype, device=device,
                                                          mlp=mlp, attention=attention) for i in layers})
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)


class DecoderForCausalLM(nn.Module):
    """A Llama-family causal LM: this rank's pipeline stage, its layers split over ``tp`` ranks.

    The first stage holds the embedding, the last the final norm and LM head; with a
    tied LM head and several stages, the last stage holds its own copy of the embedding
    rows, loaded from the embedding's checkpoint tensor.

    Example:
        >>> from distload.models.config import DecoderConfig
        >>> cfg = DecoderConfig.from_json({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2}, LLAMA.decoder)
        >>> m = DecoderForCausalLM(cfg, tp=2, device="meta")
        >>> tuple(m.model.embed_tokens.weight.shape)
        (50, 32)
    """

    def __init__(self, cfg: DecoderConfig, *, tp: int = 1, tp_rank: int = 0, ops: Collectives = SOLO,
                 pipe: PipeOps = SINGLE_STAGE, layers: range | None = None, mlp: MLPFactory | None = None,
                 attention: AttentionFactory | None = None, forward_error: str | None = None,
                 rotary: Rotary | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = rotary
        self.pipe = pipe
        self.forward_error = forward_error  # why this model's reference forward cannot be trusted
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.model = DecoderBody(cfg, layers, first=pipe.first, last=pipe.last, tp=tp, tp_rank=tp_rank, ops=ops,
                                 dtype=dtype, device=device, mlp=mlp, attention=attention)
        if pipe.last:
            shared = self.model.embed_tokens if (cfg.tie_word_embeddings and pipe.first) else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp=tp, ops=ops, dtype=dtype,
                                          device=device, tied=shared, tied_name="model.embed_tokens.weight",
                                          tied_copy=cfg.tie_word_embeddings and not pipe.first)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Returns float logits ``[batch, seq, vocab]`` (full vocabulary, every TP rank) on the
        last pipeline stage; earlier stages hand their output on and return None."""
        if self.forward_error:
            raise ConfigError(self.forward_error)
        b, s = input_ids.shape
        weight = next(self.parameters())
        if self.pipe.first:
            x = self.model.embed_tokens(input_ids)
        else:
            x = self.pipe.recv_prev((b, s, self.config.hidden_size), weight.dtype, weight.device)
        pos = torch.arange(s, device=input_ids.device, dtype=torch.float32)
        inv, scale = self.rotary(s) if self.rotary is not None else (rotary_inv_freq(self.config), 1.0)
        freqs = pos[:, None] * inv.to(input_ids.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin)
        if not self.pipe.last:
            self.pipe.send_next(x)
            return None
        return self.lm_head(self.model.norm(x))


def read_dense(config: Mapping, arch: Architecture) -> DecoderConfig:
    """Reads a dense decoder's config.json with its architecture's knobs.

    Raises:
        ConfigError: naming the field and its value.
    """
    return DecoderConfig.from_json(config, arch.decoder)


def build_dense(cfg: DecoderConfig, ctx: BuildContext) -> DecoderForCausalLM:
    """The reference dense decoder of this rank (its stage, its TP shard)."""
    return DecoderForCausalLM(cfg, tp=ctx.tp, tp_rank=ctx.tp_rank, ops=ctx.ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(cfg.num_hidden_layers, ctx.stage), dtype=ctx.dtype,
                              device=ctx.device)


# which projections have biases, and where attention slides, follows each transformers model class
LLAMA = Architecture(model_type="llama", decoder=DecoderTraits(qkv_bias=None, o_bias=True, mlp_bias=True),
                     read=read_dense, build=build_dense)
MISTRAL = Architecture(model_type="mistral", decoder=DecoderTraits(qkv_bias=False, windows=every_layer_window),
                       read=read_dense, build=build_dense)
QWEN2 = Architecture(model_type="qwen2", decoder=DecoderTraits(qkv_bias=True, windows=layer_type_windows),
                     read=read_dense, build=build_dense)
QWEN3 = Architecture(model_type="qwen3", decoder=DecoderTraits(qkv_bias=None, o_bias=True, qk_norm=True,
                                                               windows=layer_type_windows),
                     read=read_dense, build=build_dense)
