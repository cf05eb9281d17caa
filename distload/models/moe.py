"""Mixture-of-experts decoders: mixtral, qwen2_moe (with a gated shared expert), qwen3_moe.

Attention, norms, embedding and head are the dense family's (mistral, qwen2, qwen3);
the feed-forward of sparse layers is a router plus this rank's expert slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..experts import ExpertFacts
from ..layers import ColumnParallelLinear, Part, ReplicatedLinear, RowParallelLinear
from ..layers.moe import ExpertExchange, FusedExperts, Router
from ..layers.packed_moe import PackedExperts
from .arch import Architecture, BuildContext
from .config import DecoderConfig
from .fields import MAX_EXPERTS, MAX_VALUES, Fields
from .llama import MISTRAL, MLP, QWEN2, QWEN3, DecoderForCausalLM


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseBlock:
    """What one MoE model type fixes about its sparse feed-forward."""

    name: str
    """checkpoint name of the feed-forward module"""
    expert_names: tuple[str, str, str]
    """gate, up, down of expert ``{expert}``, relative to the block"""
    intermediate_key: str
    """config.json key of one expert's intermediate size"""
    renormalize: bool | None
    """the top-k weights are rescaled to sum to one (None: as config.json norm_topk_prob says)"""
    step_layers: bool
    """``decoder_sparse_step`` and ``mlp_only_layers`` choose the sparse layers (else: all are)"""
    shared_expert: bool
    """a gated shared expert of ``shared_expert_intermediate_size``"""


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """The config.json fields of a mixture-of-experts decoder."""

    dense: DecoderConfig
    """attention, norms, embedding, head and the dense layers' MLP"""
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
    def from_json(cls, cfg: Mapping, arch: Architecture) -> "MoEConfig":
        """Reads a mixtral / qwen2_moe / qwen3_moe config.json as ``arch`` describes it.

        Raises:
            ConfigError: naming the field and its value.
        """
        dense = DecoderConfig.from_json(cfg, arch.decoder)
        block: SparseBlock = arch.block
        f = Fields(cfg)
        layers, hidden = f.integer("num_hidden_layers"), f.integer("hidden_size")
        experts = expert_count(f, arch.expert_keys)
        top_k = f.integer("num_experts_per_tok", maximum=experts)
        sparse = frozenset(range(layers))
        if block.step_layers:
            step = f.integer("decoder_sparse_step", 1)
            dense_layers = set(f.integers("mlp_only_layers", (), maximum=layers - 1, what="layer indices",
                                          nullable=True))
            sparse = frozenset(i for i in sparse if i not in dense_layers and (i + 1) % step == 0)
        key = block.intermediate_key
        inter = f.integer(key)
        f.at_most(f"{arch.expert_keys[0]} * {key} * hidden_size", experts * inter * hidden, MAX_VALUES)
        shared = f.integer("shared_expert_intermediate_size", 0, minimum=0) if block.shared_expert else 0
        renormalize = f.flag("norm_topk_prob", False) if block.renormalize is None else block.renormalize
        return cls(dense=dense, block_name=block.name, expert_names=block.expert_names, num_experts=experts,
                   top_k=top_k, intermediate=inter, renormalize=renormalize, shared_intermediate=shared,
                   sparse_layers=sparse)

    def expert_facts(self) -> ExpertFacts:
        """The experts an expert map is checked against."""
        return ExpertFacts(num_experts=self.num_experts, num_layers=self.dense.num_hidden_layers,
                           sparse_layers=self.sparse_layers)


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

    def __init__(self, router: nn.Module, experts: FusedExperts | PackedExperts, exchange: ExpertExchange, *,
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


def expert_exchange(ctx: BuildContext) -> ExpertExchange:
    """The token exchange of this rank's experts: over its TP group (ep = 1) or its whole stage."""
    lay = ctx.layout
    return ExpertExchange(tp_ops=ctx.ops, stage_ops=ctx.stage_ops if lay.ep > 1 else None,
                          stage_index=ctx.rank - lay.stage_ranks(ctx.stage)[0])


def routed_experts(ctx: BuildContext, layer: int, *, hidden: int, intermediate: int,
                   names: tuple[str, str, str]) -> FusedExperts:
    """This rank's expert slots of ``layer``, placed as ``ctx.experts`` says."""
    group, _ = ctx.layout.expert_coords(ctx.rank)
    return FusedExperts(hidden, intermediate, ctx.experts.placement(layer), group=group, etp=ctx.layout.expert_tp,
                        names=names, dtype=ctx.dtype, device=ctx.device)


def packed_experts(ctx: BuildContext, layer: int, *, hidden: int, intermediate: int, path: str | None = None,
                   **kwargs) -> PackedExperts:
    """This rank's expert slots of ``layer`` read from packed expert tensors, placed as ``ctx.experts``
    says (``kwargs``: the packing and activation, as ``PackedExperts`` takes them).

    Args:
        path: the experts' module name; the checkpoint's scheme for it may split them on whole
            blocks (``QuantConfig.feature_block``). None: split evenly.
    """
    group, shard = ctx.layout.expert_coords(ctx.rank)
    block = None if path is None else ctx.quant.feature_block(path, PackedExperts.TARGET)
    return PackedExperts(hidden, intermediate, ctx.experts.placement(layer), group=group, shard=shard,
                         etp=ctx.layout.expert_tp, block=block, dtype=ctx.dtype, device=ctx.device, **kwargs)


def build_moe_model(moe: MoEConfig, ctx: BuildContext) -> nn.Module:
    """The reference MoE model of this rank (its stage, its expert group), its experts placed as
    ``ctx.experts`` says."""
    dense, exchange = moe.dense, expert_exchange(ctx)
    tp, ops, dtype, device = ctx.tp, ctx.ops, ctx.dtype, ctx.device

    def ffn(layer: int) -> tuple[str, nn.Module]:
        if layer in moe.sparse_layers:
            h = dense.hidden_size
            router = Router(moe.num_experts, h, top_k=moe.top_k, renormalize=moe.renormalize, dtype=dtype,
                            device=device)
            experts = routed_experts(ctx, layer, hidden=h, intermediate=moe.intermediate,
                                     names=moe.expert_names)
            shared = gate = None
            if moe.shared_intermediate:
                shared = ("shared_expert", DenseFFN(h, moe.shared_intermediate, tp=tp, ops=ops, dtype=dtype,
                                                    device=device))
                # like the router, never quantized (serving engines build it unquantized too)
                gate = ReplicatedLinear(h, 1, quantizable=False, dtype=dtype, device=device)
            return moe.block_name, SparseMoE(router, experts, exchange, shared=shared, shared_gate=gate)
        return "mlp", MLP(dense, tp=tp, ops=ops, dtype=dtype, device=device)

    return DecoderForCausalLM(dense, tp=tp, tp_rank=ctx.tp_rank, ops=ops, pipe=ctx.pipe,
                              layers=ctx.layout.stage_layers(dense.num_hidden_layers, ctx.stage), mlp=ffn,
                              dtype=dtype, device=device)


QWEN_MOE_BLOCK = SparseBlock(name="mlp", expert_names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj",
                                                       "experts.{expert}.down_proj"),
                             intermediate_key="moe_intermediate_size", renormalize=None, step_layers=True,
                             shared_expert=False)
"""qwen3_moe's sparse block (qwen2_moe's adds the gated shared expert)"""

# transformers' attribute_map lets mixtral and qwen3_moe configs name the expert count either way
# (transformers 5 writes the first); the attention and norms are those of a dense type
MIXTRAL = Architecture(model_type="mixtral", decoder=MISTRAL.decoder, read=MoEConfig.from_json, build=build_moe_model,
                       experts=MoEConfig.expert_facts, expert_keys=("num_local_experts", "num_experts"),
                       block=SparseBlock(name="block_sparse_moe", expert_names=(
                           "experts.{expert}.w1", "experts.{expert}.w3", "experts.{expert}.w2"),
                           intermediate_key="intermediate_size", renormalize=True, step_layers=False,
                           shared_expert=False))
QWEN2_MOE = Architecture(model_type="qwen2_moe", decoder=QWEN2.decoder, read=MoEConfig.from_json,
                         build=build_moe_model, experts=MoEConfig.expert_facts, expert_keys=("num_experts",),
                         block=dataclasses.replace(QWEN_MOE_BLOCK, shared_expert=True))
QWEN3_MOE = Architecture(model_type="qwen3_moe", decoder=QWEN3.decoder, read=MoEConfig.from_json,
                         build=build_moe_model, experts=MoEConfig.expert_facts,
                         expert_keys=("num_local_experts", "num_experts"), block=QWEN_MOE_BLOCK)
