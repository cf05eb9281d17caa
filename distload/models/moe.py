"""Mixture-of-experts decoders: mixtral, qwen2_moe (with a gated shared expert), qwen3_moe.

Attention, norms, embedding and head are the dense family's (mistral, qwen2, qwen3);
the feed-forward of sparse layers is a router plus this rank's expert slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..experts import ExpertPlacement
from ..layers import ColumnParallelLinear, Part, RowParallelLinear
from ..layers.moe import ExpertExchange, FusedExperts, Router
from .config import DecoderConfig
from .llama import MLP, DecoderForCausalLM


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """The config.json fields of the sparse feed-forward."""

    block_name: str
    """checkpoint name of the feed-forward module (``block_sparse_moe`` or ``mlp``)"""
    expert_names: tuple[str, str, str]
    """gate, up, down of expert ``{expert}``, relative to the block"""
    num_experts: int
    """logical experts"""
    top_k: int
    """experts per token"""
    intermediate: int
    """one expert's intermediate size"""
    renormalize: bool
    """rescale the top-k weights to sum to one"""
    shared_intermediate: int
    """size of the gated shared expert (qwen2_moe), 0: none"""
    sparse_layers: frozenset[int]
    """layers whose feed-forward is sparse (the others are dense MLPs)"""

    @classmethod
    def from_json(cls, cfg: Mapping) -> "MoEConfig":
        mt = cfg.get("model_type")
        layers = int(cfg["num_hidden_layers"])
        # transformers writes either name, depending on the model and its version
        experts = int(cfg.get("num_local_experts") or cfg["num_experts"])
        if mt == "mixtral":
            return cls(block_name="block_sparse_moe", expert_names=("experts.{expert}.w1", "experts.{expert}.w3",
                                                                    "experts.{expert}.w2"),
                       num_experts=experts, top_k=int(cfg["num_experts_per_tok"]),
                       intermediate=int(cfg["intermediate_size"]), renormalize=True, shared_intermediate=0,
                       sparse_layers=frozenset(range(layers)))
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or ())
        return cls(block_name="mlp", expert_names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj",
                                                   "experts.{expert}.down_proj"),
                   num_experts=experts, top_k=int(cfg["num_experts_per_tok"]),
                   intermediate=int(cfg["moe_intermediate_size"]), renormalize=bool(cfg.get("norm_topk_prob")),
                   shared_intermediate=int(cfg.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0,
                   sparse_layers=frozenset(i for i in range(layers) if i not in dense and (i + 1) % step == 0))


class SparseMoE(nn.Module):
    """Router, this rank's experts and (qwen2_moe) the gated shared expert."""

    def __init__(self, dense: DecoderConfig, moe: MoEConfig, placement: ExpertPlacement, *, group: int, etp: int,
                 tp: int, exchange: ExpertExchange, dtype, device) -> None:
        super().__init__()
        self.moe, self.exchange = moe, exchange
        self.gate = Router(moe.num_experts, dense.hidden_size, dtype=dtype, device=device)
        self.experts = FusedExperts(dense.hidden_size, moe.intermediate, placement, group=group, etp=etp,
                                    names=moe.expert_names, dtype=dtype, device=device)
        if moe.shared_intermediate:
            h, i = dense.hidden_size, moe.shared_intermediate
            self.shared_expert = _DenseFFN(h, i, tp=tp, ops=exchange.tp_ops, dtype=dtype, device=device)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(-1, h)
        everyone = self.exchange.gather(tokens)
        weights, experts = self.gate(everyone, self.moe.top_k, self.moe.renormalize)
        out = self.exchange.scatter_sum(self.experts(everyone, weights, experts), tokens.shape[0])
        if self.moe.shared_intermediate:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.reshape(b, s, h)


class _DenseFFN(nn.Module):
    """A TP-split SiLU MLP with unfused checkpoint names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden: int, inter: int, *, tp: int, ops, dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [Part(name="gate_proj", out_features=inter, num_shards=tp),
                                                          Part(name="up_proj", out_features=inter, num_shards=tp)],
                                                 tp=tp, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(inter, hidden, tp=tp, ops=ops, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def build_moe_model(config: Mapping, *, tp: int, tp_rank: int, ops, pipe, layers, layout, rank_group: int,
                    etp: int, exchange: ExpertExchange, placement_kind: str, redundant: int,
                    expert_map: Mapping[int, tuple[int, ...]] | None, dtype, device) -> nn.Module:
    """The reference MoE model of this rank (its stage, its expert group).

    ``expert_map`` (layer -> slot list, ``-1`` for the default) overrides the redundant-expert
    rule per layer; see ``experts.parse_expert_map``.
    """
    dense = DecoderConfig.from_json(config)
    try:
        moe = MoEConfig.from_json(config)
    except KeyError as err:
        raise ConfigError(f"config.json has no {err.args[0]!r}, which model_type "
                          f"{config.get('model_type')!r} needs") from None
    default = ExpertPlacement.make(num_experts=moe.num_experts, ep=layout.ep, kind=placement_kind,
                                   redundant=redundant)
    placements = {layer: ExpertPlacement.from_slots(num_experts=moe.num_experts, ep=layout.ep, kind=placement_kind,
                                                    slots=slots)
                  for layer, slots in (expert_map or {}).items()}

    def ffn(layer: int) -> tuple[str, nn.Module]:
        placement = placements.get(layer, placements.get(-1, default))
        if layer in moe.sparse_layers:
            return moe.block_name, SparseMoE(dense, moe, placement, group=rank_group, etp=etp, tp=tp,
                                             exchange=exchange, dtype=dtype, device=device)
        return "mlp", MLP(dense, tp=tp, ops=ops, dtype=dtype, device=device)

    return DecoderForCausalLM(dense, tp=tp, tp_rank=tp_rank, ops=ops, pipe=pipe, layers=layers, mlp=ffn,
                              dtype=dtype, device=device)
