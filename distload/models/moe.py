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
from ..layers import ColumnParallelLinear, Part, ReplicatedLinear, RowParallelLinear
from ..layers.moe import ExpertExchange, FusedExperts, Router
from .config import DecoderConfig
from .fields import MAX_EXPERTS, MAX_VALUES, Fields
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
        """Reads the sparse feed-forward's fields of a mixtral / qwen2_moe / qwen3_moe config.json.

        Raises:
            ConfigError: naming the field and its value.
        """
        f = Fields(cfg)
        mt = f.text("model_type")
        layers, hidden = f.integer("num_hidden_layers"), f.integer("hidden_size")
        experts = expert_count(f, EXPERT_KEYS[mt])
        top_k = f.integer("num_experts_per_tok", maximum=experts)
        if mt == "mixtral":
            inter = f.integer("intermediate_size")
            f.at_most(f"{EXPERT_KEYS[mt][0]} * intermediate_size * hidden_size", experts * inter * hidden, MAX_VALUES)
            return cls(block_name="block_sparse_moe", expert_names=("experts.{expert}.w1", "experts.{expert}.w3",
                                                                    "experts.{expert}.w2"),
                       num_experts=experts, top_k=top_k, intermediate=inter, renormalize=True, shared_intermediate=0,
                       sparse_layers=frozenset(range(layers)))
        step = f.integer("decoder_sparse_step", 1)
        dense = set(f.integers("mlp_only_layers", (), maximum=layers - 1, what="layer indices", nullable=True))
        inter = f.integer("moe_intermediate_size")
        f.at_most(f"{EXPERT_KEYS[mt][0]} * moe_intermediate_size * hidden_size", experts * inter * hidden, MAX_VALUES)
        shared = f.integer("shared_expert_intermediate_size", 0, minimum=0) if mt == "qwen2_moe" else 0
        return cls(block_name="mlp", expert_names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj",
                                                   "experts.{expert}.down_proj"),
                   num_experts=experts, top_k=top_k, intermediate=inter,
                   renormalize=f.flag("norm_topk_prob", False), shared_intermediate=shared,
                   sparse_layers=frozenset(i for i in range(layers) if i not in dense and (i + 1) % step == 0))


EXPERT_KEYS = {"mixtral": ("num_local_experts", "num_experts"), "qwen2_moe": ("num_experts",),
               "qwen3_moe": ("num_local_experts", "num_experts")}
"""config.json keys of the expert count, per model type (transformers' attribute_map lets mixtral
and qwen3_moe configs use either name; transformers 5 writes the first)"""


def expert_count(f: Fields, keys: tuple[str, ...]) -> int:
    """The expert count under the first of ``keys`` present; several present must agree.

    Raises:
        ConfigError: none present, a count out of range, or two that differ.
    """
    present = [key for key in keys if key in f.values]
    if not present:
        raise f.absent(keys[0])
    counts = {key: f.integer(key, cap=MAX_EXPERTS) for key in present}
    if len(set(counts.values())) > 1:
        a, b = present[:2]
        raise ConfigError(f"config.json {a} ({counts[a]}) and {b} ({counts[b]}) disagree")
    return counts[present[0]]


class SparseMoE(nn.Module):
    """A router, this rank's experts and, optionally, shared experts (gated for qwen2_moe)."""

    def __init__(self, router: nn.Module, experts: FusedExperts, exchange: ExpertExchange, *,
                 shared: tuple[str, nn.Module] | None = None, shared_gate: nn.Module | None = None,
                 router_name: str = "gate") -> None:
        super().__init__()
        self.exchange, self.router_name = exchange, router_name
        self.add_module(router_name, router)
        self.experts = experts
        self.shared_name = None
        if shared is not None:
            self.shared_name = shared[0]
            self.add_module(shared[0], shared[1])
        if shared_gate is not None:
            self.shared_expert_gate = shared_gate
        self.gated = shared_gate is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(-1, h)
        everyone = self.exchange.gather(tokens)
        weights, experts = getattr(self, self.router_name)(everyone)
        out = self.exchange.scatter_sum(self.experts(everyone, weights, experts), tokens.shape[0])
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(tokens)
            out = out + (torch.sigmoid(self.shared_expert_gate(tokens)) * shared if self.gated else shared)
        return out.reshape(b, s, h)


class DenseFFN(nn.Module):
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
    dense, moe = DecoderConfig.from_json(config), MoEConfig.from_json(config)
    default = ExpertPlacement.make(num_experts=moe.num_experts, ep=layout.ep, kind=placement_kind,
                                   redundant=redundant)
    placements = {layer: ExpertPlacement.from_slots(num_experts=moe.num_experts, ep=layout.ep, kind=placement_kind,
                                                    slots=slots)
                  for layer, slots in (expert_map or {}).items()}

    def ffn(layer: int) -> tuple[str, nn.Module]:
        placement = placements.get(layer, placements.get(-1, default))
        if layer in moe.sparse_layers:
            h = dense.hidden_size
            router = Router(moe.num_experts, h, top_k=moe.top_k, renormalize=moe.renormalize, dtype=dtype,
                            device=device)
            experts = FusedExperts(h, moe.intermediate, placement, group=rank_group, etp=etp,
                                   names=moe.expert_names, dtype=dtype, device=device)
            shared = gate = None
            if moe.shared_intermediate:
                shared = ("shared_expert", DenseFFN(h, moe.shared_intermediate, tp=tp, ops=ops, dtype=dtype,
                                                    device=device))
                # like the router, never quantized (serving engines build it unquantized too)
                gate = ReplicatedLinear(h, 1, quantizable=False, dtype=dtype, device=device)
            return moe.block_name, SparseMoE(router, experts, exchange, shared=shared, shared_gate=gate)
        return "mlp", MLP(dense, tp=tp, ops=ops, dtype=dtype, device=device)

    return DecoderForCausalLM(dense, tp=tp, tp_rank=tp_rank, ops=ops, pipe=pipe, layers=layers, mlp=ffn,
                              dtype=dtype, device=device)
