"""DeepSeek-V3: multi-head latent attention (MLA), dense first layers, grouped sigmoid routing
with a float32 correction bias, shared experts, and an ignored multi-token-prediction layer.

Under TP the low-rank projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms
are replicated; ``q_b_proj`` (or ``q_proj``), ``kv_b_proj`` and ``o_proj`` split by heads.
Rope: the default one, or ``yarn`` (its attention factor on cos and sin, and with
``mscale_all_dim`` its mscale squared on the softmax scale), as released DeepSeek-V3 configs set it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Collectives
from ..errors import ConfigError, PlanError
from ..experts import ExpertFacts
from ..layers import ColumnParallelLinear, Part, ReplicatedLinear, RMSNorm, RowParallelLinear
from ..quant.layer import KVCacheScales
from .arch import Architecture, BuildContext
from .config import DecoderConfig, read_rope
from .fields import MAX_EXPERTS, MAX_SIZE, MAX_VALUES, Fields
from .llama import LLAMA, MLP, DecoderForCausalLM
from .moe import DenseFFN, SparseMoE, expert_count, expert_exchange, routed_experts
from .rope import Yarn, read_yarn


@dataclass(frozen=True, kw_only=True, slots=True)
class DeepseekConfig:
    """The config.json fields of DeepSeek-V3's latent attention and routed experts."""

    dense: DecoderConfig
    """embedding, norms, dense MLPs and the rotary width (``qk_rope_head_dim``)"""
    rope_type: str
    """the configured rotary kind (the reference forward implements ``default`` and ``yarn``)"""
    yarn: Yarn | None
    """the yarn parameters (rotary tables, cos/sin scale, the softmax scale's mscale); None: not yarn"""
    num_heads: int
    """attention heads"""
    q_lora_rank: int | None
    """rank of the low-rank query projection; None: one full ``q_proj``"""
    kv_lora_rank: int
    """rank of the low-rank key/value projection"""
    qk_nope_head_dim: int
    """per-head query/key width without rotary"""
    qk_rope_head_dim: int
    """per-head query/key width with rotary"""
    v_head_dim: int
    """per-head value width"""
    attention_bias: bool
    """the low-rank and output projections have biases"""
    rope_interleave: bool
    """rotary pairs are adjacent channels"""
    num_experts: int
    """routed experts"""
    top_k: int
    """experts per token"""
    num_groups: int
    """expert groups of the router (``n_group``)"""
    topk_group: int
    """groups a token may use"""
    renormalize: bool
    """rescale the top-k weights to sum to one"""
    routed_scaling_factor: float
    """factor on the routed experts' weights"""
    moe_intermediate: int
    """one expert's width"""
    shared_intermediate: int
    """width of the shared experts together, 0: none"""
    first_dense: int
    """the first layers with a dense MLP (``first_k_dense_replace``)"""
    num_mtp_layers: int
    """multi-token-prediction layers after the decoder layers (ignored when loading)"""

    @classmethod
    def from_json(cls, cfg: Mapping, arch: Architecture) -> "DeepseekConfig":
        """Reads a DeepSeek-V3 config.json dict as ``arch`` describes it, every field type- and range-checked.

        Raises:
            ConfigError: naming the field and its value.
        """
        f = Fields(cfg)
        layers, hidden = f.integer("num_hidden_layers"), f.integer("hidden_size")
        heads = f.integer("num_attention_heads")
        rope_dim = f.integer("qk_rope_head_dim")
        if rope_dim % 2:  # the rotary embedding turns pairs of channels
            raise ConfigError(f"config.json qk_rope_head_dim must be even, got {rope_dim}")
        _, rope_type, params = read_rope(f)
        # rotary tables span the rope part of a head only; yarn is read below, other kinds only named
        dense = DecoderConfig.from_json(cfg, arch.decoder, head_dim=rope_dim, default_rope=True)
        nope, v_dim, kv_rank = f.integer("qk_nope_head_dim"), f.integer("v_head_dim"), f.integer("kv_lora_rank")
        f.at_most("num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)", heads * (nope + rope_dim), MAX_SIZE)
        f.at_most("num_attention_heads * (qk_nope_head_dim + v_head_dim)", heads * (nope + v_dim), MAX_SIZE)
        f.at_most("kv_lora_rank + qk_rope_head_dim", kv_rank + rope_dim, MAX_SIZE)
        key = arch.expert_keys[0]
        experts = expert_count(f, arch.expert_keys)
        groups = f.integer("n_group", 1, nullable=True)
        if experts % groups:
            raise ConfigError(f"config.json n_group must divide {key} ({experts}), got {groups}")
        inter = f.integer("moe_intermediate_size")
        f.at_most(f"{key} * moe_intermediate_size * hidden_size", experts * inter * hidden, MAX_VALUES)
        shared = f.integer("n_shared_experts", 1, minimum=0, cap=MAX_EXPERTS) * inter
        f.at_most("n_shared_experts * moe_intermediate_size", shared, MAX_SIZE)
        return cls(dense=dense, rope_type=rope_type, yarn=read_yarn(f, params) if rope_type == "yarn" else None,
                   num_heads=heads,
                   q_lora_rank=f.integer("q_lora_rank", None, nullable=True), kv_lora_rank=kv_rank,
                   qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
                   attention_bias=f.flag("attention_bias", False),
                   rope_interleave=f.flag("rope_interleave", True, nullable=True),
                   num_experts=experts, top_k=f.integer("num_experts_per_tok", maximum=experts),
                   num_groups=groups, topk_group=f.integer("topk_group", 1, maximum=groups, nullable=True),
                   renormalize=f.flag("norm_topk_prob", True, nullable=True),
                   routed_scaling_factor=f.number("routed_scaling_factor", 1.0),
                   moe_intermediate=inter, shared_intermediate=shared,
                   first_dense=f.integer("first_k_dense_replace", 0, minimum=0, maximum=layers, nullable=True),
                   num_mtp_layers=_mtp_layers(f, layers))

    def rotary(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """The yarn inverse frequencies over the rope part of a head (float32) and the cos/sin scale."""
        dense = self.dense
        return self.yarn.inv_freq(dense.head_dim, dense.rope_theta), self.yarn.attention_factor

    def expert_facts(self) -> ExpertFacts:
        """The experts an expert map is checked against: every layer after the dense first ones."""
        layers = self.dense.num_hidden_layers
        return ExpertFacts(num_experts=self.num_experts, num_layers=layers,
                           sparse_layers=frozenset(range(self.first_dense, layers)))


def mtp_ignore_patterns(config: Mapping) -> tuple[str, ...]:
    """The multi-token-prediction layers real checkpoints carry after the last decoder layer
    (``model.layers.{num_hidden_layers}.*``): ignored, and listed as ignored.

    Raises:
        ConfigError: ``num_hidden_layers`` or ``num_nextn_predict_layers`` (at most one per
            decoder layer) out of range.
    """
    f = Fields(config)
    n = f.integer("num_hidden_layers")
    return tuple(rf"^model\.layers\.{i}\." for i in range(n, n + max(_mtp_layers(f, n), 1)))


def _mtp_layers(f: Fields, layers: int) -> int:
    return f.integer("num_nextn_predict_layers", 0, minimum=0, maximum=layers)


class LatentAttention(nn.Module, KVCacheScales):
    """MLA with this rank's heads: ``forward(x, cos, sin)`` like the GQA attention (with an FP8
    KV cache, ``k_scale`` / ``v_scale`` are loaded and tracked; the forward keeps no cache)."""

    def __init__(self, cfg: DeepseekConfig, *, tp: int, ops: Collectives, eps: float, dtype, device) -> None:
        super().__init__()
        heads = cfg.num_heads
        if heads % tp:
            raise PlanError(f"num_attention_heads={heads} is not divisible by tp={tp}")
        h = cfg.dense.hidden_size
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.q_rank = cfg.q_lora_rank
        self.heads = heads // tp
        self.interleave = cfg.rope_interleave
        qk = self.nope + self.rope
        # yarn's mscale corrects the softmax scale as well as cos and sin (transformers' yarn_apply_mscale)
        self.scaling = qk ** -0.5 * (cfg.yarn.softmax_scale() if cfg.yarn is not None else 1.0)
        bias = cfg.attention_bias
        if self.q_rank is None:
            self.q_proj = ColumnParallelLinear(h, [Part(name="", out_features=heads * qk, num_shards=tp)], tp=tp,
                                               dtype=dtype, device=device)
        else:
            self.q_a_proj = ReplicatedLinear(h, self.q_rank, bias=bias, dtype=dtype, device=device)
            self.q_a_layernorm = RMSNorm(self.q_rank, eps, dtype=dtype, device=device)
            self.q_b_proj = ColumnParallelLinear(self.q_rank, [Part(name="", out_features=heads * qk,
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

    def __init__(self, cfg: DeepseekConfig, hidden: int, device) -> None:
        super().__init__()
        self.top_k, self.groups, self.topk_group = cfg.top_k, cfg.num_groups, cfg.topk_group
        self.renormalize, self.scale = cfg.renormalize, cfg.routed_scaling_factor
        num_experts = cfg.num_experts
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


def build_deepseek_model(cfg: DeepseekConfig, ctx: BuildContext) -> nn.Module:
    """The reference DeepSeek-V3 model of this rank (its stage, its expert group), its experts
    placed as ``ctx.experts`` says."""
    dense, inter, first_dense, shared = cfg.dense, cfg.moe_intermediate, cfg.first_dense, cfg.shared_intermediate
    tp, ops, dtype, device = ctx.tp, ctx.ops, ctx.dtype, ctx.device
    forward_error = None
    if cfg.rope_type not in ("default", "yarn"):
        # loading and tracking do not depend on it; only the reference forward would be wrong
        forward_error = (f"the reference DeepSeek-V3 forward implements rope_type 'default' and 'yarn' only, "
                         f"not {cfg.rope_type!r}")
    exchange = expert_exchange(ctx)
    h = dense.hidden_size

    def attention(layer: int) -> nn.Module:
        return LatentAttention(cfg, tp=tp, ops=ops, eps=dense.rms_norm_eps, dtype=dtype, device=device)

    def ffn(layer: int) -> tuple[str, nn.Module]:
        if layer < first_dense:
            return "mlp", MLP(dense, tp=tp, ops=ops, dtype=dtype, device=device)
        experts = routed_experts(ctx, layer, hidden=h, intermediate=inter,
                                 names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj",
                                        "experts.{expert}.down_proj"))
        common = ("shared_experts", DenseFFN(h, shared, tp=tp, ops=ops, dtype=dtype, device=device)) if shared else None
        return "mlp", SparseMoE(GroupedRouter(cfg, h, device), experts, exchange, shared=common)

    return DecoderForCausalLM(dense, tp=tp, tp_rank=ctx.tp_rank, ops=ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(dense.num_hidden_layers, ctx.stage), mlp=ffn,
                              attention=attention, forward_error=forward_error,
                              rotary=cfg.rotary if cfg.yarn is not None else None, dtype=dtype, device=device)


# the dense parts are llama's; transformers' attribute_map accepts the second expert key
DEEPSEEK_V3 = Architecture(model_type="deepseek_v3", decoder=LLAMA.decoder, read=DeepseekConfig.from_json,
                           build=build_deepseek_model, experts=DeepseekConfig.expert_facts,
                           expert_keys=("n_routed_experts", "num_local_experts"), ignores=mtp_ignore_patterns)
