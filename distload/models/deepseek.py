"""DeepSeek-V3: multi-head latent attention (MLA), dense first layers, grouped sigmoid routing
with a float32 correction bias, shared experts, and an ignored multi-token-prediction layer.

Under TP the low-rank projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms
are replicated; ``q_b_proj`` (or ``q_proj``), ``kv_b_proj`` and ``o_proj`` split by heads.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Collectives
from ..errors import ConfigError, PlanError
from ..experts import ExpertPlacement
from ..layers import ColumnParallelLinear, Part, ReplicatedLinear, RMSNorm, RowParallelLinear
from ..quant.layer import KVCacheScales
from ..layers.moe import ExpertExchange, FusedExperts
from .config import DecoderConfig
from .llama import MLP, DecoderForCausalLM
from .moe import DenseFFN, SparseMoE


def mtp_ignore_patterns(config: Mapping) -> tuple[str, ...]:
    """The multi-token-prediction layers real checkpoints carry after the last decoder layer
    (``model.layers.{num_hidden_layers}.*``): ignored, and listed as ignored."""
    n = int(config.get("num_hidden_layers", 0))
    extra = int(config.get("num_nextn_predict_layers") or 0)
    return tuple(rf"^model\.layers\.{i}\." for i in range(n, n + max(extra, 1)))


class LatentAttention(nn.Module, KVCacheScales):
    """MLA with this rank's heads: ``forward(x, cos, sin)`` like the GQA attention (with an FP8
    KV cache, ``k_scale`` / ``v_scale`` are loaded and tracked; the forward keeps no cache)."""

    def __init__(self, cfg: Mapping, *, tp: int, ops: Collectives, eps: float, dtype, device) -> None:
        super().__init__()
        heads = int(cfg["num_attention_heads"])
        if heads % tp:
            raise PlanError(f"num_attention_heads={heads} is not divisible by tp={tp}")
        h = int(cfg["hidden_size"])
        self.nope, self.rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        self.v_dim, self.kv_rank = int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"])
        self.q_rank = cfg.get("q_lora_rank")
        self.heads = heads // tp
        self.interleave = bool(cfg.get("rope_interleave", True))
        qk = self.nope + self.rope
        self.scaling = qk ** -0.5
        bias = bool(cfg.get("attention_bias", False))
        if self.q_rank is None:
            self.q_proj = ColumnParallelLinear(h, [Part(name="", out_features=heads * qk, num_shards=tp)], tp=tp,
                                               dtype=dtype, device=device)
        else:
            self.q_a_proj = ReplicatedLinear(h, int(self.q_rank), bias=bias, dtype=dtype, device=device)
            self.q_a_layernorm = RMSNorm(int(self.q_rank), eps, dtype=dtype, device=device)
            self.q_b_proj = ColumnParallelLinear(int(self.q_rank), [Part(name="", out_features=heads * qk,
                                                                         num_shards=tp)],
                                                 tp=tp, dtype=dtype, device=device)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, self.kv_rank + self.rope, bias=bias, dtype=dtype, device=device)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, eps, dtype=dtype, device=device)
        self.kv_b_proj = ColumnParallelLinear(self.kv_rank, [Part(name="", out_features=heads * (self.nope + self.v_dim),
                                                                  num_shards=tp)], tp=tp, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(heads * self.v_dim, h, tp=tp, bias=bias, ops=ops, dtype=dtype, device=device)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:  # pairs (x0, x1), (x2, x3), ... each turned by one frequency
            c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.cat([a * c - b * s, b * c + a * s], dim=-1)
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-b, a), dim=-1) * sin

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.heads, self.nope + self.rope).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope)).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rot = self._rotate(q_rot, cos, sin)
        k_rot = self._rotate(k_rot.view(b, 1, s, self.rope), cos, sin).expand(-1, self.heads, -1, -1)
        q = torch.cat((q_pass, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        i = torch.arange(s, device=x.device)
        scores = scores.masked_fill(~(i[:, None] >= i[None, :]), float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.v_dim))


class GroupedRouter(nn.Module):
    """DeepSeek-V3's router: sigmoid scores plus ``e_score_correction_bias`` pick the best
    ``topk_group`` expert groups, then the top-k experts in them; weights come from the
    plain scores, optionally renormalized, times ``routed_scaling_factor``. Float32 always."""

    def __init__(self, cfg: Mapping, num_experts: int, hidden: int, device) -> None:
        super().__init__()
        self.top_k, self.groups = int(cfg["num_experts_per_tok"]), int(cfg.get("n_group") or 1)
        self.topk_group = int(cfg.get("topk_group") or 1)
        self.renormalize = bool(cfg.get("norm_topk_prob", True))
        self.scale = float(cfg.get("routed_scaling_factor") or 1.0)
        if num_experts % self.groups:
            raise PlanError(f"n_routed_experts={num_experts} is not divisible by n_group={self.groups}")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias", torch.empty(num_experts, dtype=torch.float32, device=device))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(tokens.float(), self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        n, e = choice.shape
        group_scores = choice.view(n, self.groups, e // self.groups).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1)
        mask = keep.unsqueeze(-1).expand(-1, -1, e // self.groups).reshape(n, e).bool()
        experts = choice.masked_fill(~mask, float("-inf")).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scale).to(tokens.dtype), experts


def build_deepseek_model(config: Mapping, *, tp: int, tp_rank: int, ops, pipe, layers, layout, rank_group: int,
                         etp: int, exchange: ExpertExchange, placement_kind: str, redundant: int,
                         expert_map, dtype, device) -> nn.Module:
    """The reference DeepSeek-V3 model of this rank (its stage, its expert group)."""
    try:
        # rotary tables span the rope part of a head only
        base = {**config, "model_type": "llama", "head_dim": int(config["qk_rope_head_dim"])}
        dense = DecoderConfig.from_json(base)
        num_experts = int(config["n_routed_experts"])
        first_dense = int(config.get("first_k_dense_replace") or 0)
        inter = int(config["moe_intermediate_size"])
        shared = int(config.get("n_shared_experts") or 0) * inter
    except KeyError as err:
        raise ConfigError(f"config.json has no {err.args[0]!r}, which model_type 'deepseek_v3' needs") from None
    rope = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
    forward_error = None
    if rope not in ("default", None):
        # loading and tracking do not depend on it; only the reference forward would be wrong
        forward_error = f"the reference DeepSeek-V3 forward implements rope_type 'default' only, not {rope!r}"
        dense = DecoderConfig.from_json({**base, "rope_parameters": {
            "rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}})
    default = ExpertPlacement.make(num_experts=num_experts, ep=layout.ep, kind=placement_kind, redundant=redundant)
    placements = {layer: ExpertPlacement.from_slots(num_experts=num_experts, ep=layout.ep, kind=placement_kind,
                                                    slots=slots) for layer, slots in (expert_map or {}).items()}
    h = dense.hidden_size

    def attention(layer: int) -> nn.Module:
        return LatentAttention(config, tp=tp, ops=ops, eps=dense.rms_norm_eps, dtype=dtype, device=device)

    def ffn(layer: int) -> tuple[str, nn.Module]:
        if layer < first_dense:
            return "mlp", MLP(dense, tp=tp, ops=ops, dtype=dtype, device=device)
        placement = placements.get(layer, placements.get(-1, default))
        experts = FusedExperts(h, inter, placement, group=rank_group, etp=etp,
                               names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj",
                                      "experts.{expert}.down_proj"), dtype=dtype, device=device)
        common = ("shared_experts", DenseFFN(h, shared, tp=tp, ops=ops, dtype=dtype, device=device)) if shared else None
        return "mlp", SparseMoE(GroupedRouter(config, num_experts, h, device), experts, exchange, shared=common)

    return DecoderForCausalLM(dense, tp=tp, tp_rank=tp_rank, ops=ops, pipe=pipe, layers=layers, mlp=ffn,
                              attention=attention, forward_error=forward_error, dtype=dtype, device=device)
