"""model_type -> reference model builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..comm import SINGLE_STAGE, SOLO, Collectives, PipeOps
from ..layout import Layout
from ..errors import ConfigError
from .config import DecoderConfig
from ..layers.moe import ExpertExchange
from .llama import DecoderForCausalLM
from .deepseek import build_deepseek_model, mtp_ignore_patterns
from .moe import build_moe_model

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildContext:
    """What a model builder is given: the checkpoint's config and this rank's place."""

    config: Mapping
    """the checkpoint's config.json"""
    tp: int
    """tensor-parallel degree"""
    tp_rank: int
    """this rank's index in its TP group"""
    ops: Collectives
    """collectives over this rank's TP group (for row-parallel layers, embeddings, heads)"""
    dtype: torch.dtype
    """the model dtype"""
    layout: Layout
    """the whole layout (``layout.stage_layers`` splits decoder layers over stages)"""
    stage: int = 0
    """this rank's pipeline stage"""
    pipe: PipeOps = SINGLE_STAGE
    """hand-off to the neighbouring stages"""
    rank: int = 0
    """the rank whose model this is (its expert group follows from the layout)"""
    stage_ops: Collectives = SOLO
    """collectives over all ranks of the stage (the expert exchange when ep > 1)"""
    expert_placement: str = "linear"
    """``linear`` or ``round_robin``"""
    redundant_experts: int = 0
    """extra expert slots replicating the first experts"""
    expert_map: Mapping[int, tuple[int, ...]] | None = None
    """per-layer slot -> expert lists (``-1``: every other layer), from an expert-map file"""
    device: str = "meta"
    """build here; ``load`` materializes on the rank's device afterwards"""


ModelBuilder = Callable[[BuildContext], nn.Module]
"""makes one rank's model from a BuildContext"""


def reference_model(ctx: BuildContext) -> nn.Module:
    """The default builder: ``build_model`` for the config's ``model_type``."""
    layers = None
    if ctx.layout.pp > 1:
        layers = ctx.layout.stage_layers(int(ctx.config.get("num_hidden_layers", 0)), ctx.stage)
    model_type = ctx.config.get("model_type")
    if model_type in MOE_TYPES:
        lay = ctx.layout
        group, _ = lay.expert_coords(ctx.rank)
        stage_start = lay.stage_ranks(ctx.stage)[0]
        exchange = ExpertExchange(tp_ops=ctx.ops, stage_ops=ctx.stage_ops if lay.ep > 1 else None,
                                  stage_index=ctx.rank - stage_start)
        builder = build_deepseek_model if model_type == "deepseek_v3" else build_moe_model
        return builder(ctx.config, tp=ctx.tp, tp_rank=ctx.tp_rank, ops=ctx.ops, pipe=ctx.pipe,
                               layers=layers, layout=lay, rank_group=group, etp=lay.expert_tp, exchange=exchange,
                               placement_kind=ctx.expert_placement, redundant=ctx.redundant_experts,
                               expert_map=ctx.expert_map,
                               dtype=ctx.dtype, device=ctx.device)
    return build_model(ctx.config, tp=ctx.tp, tp_rank=ctx.tp_rank, ops=ctx.ops, pipe=ctx.pipe, layers=layers,
                       dtype=ctx.dtype, device=ctx.device)


def default_ignores(config: Mapping) -> tuple[str, ...]:
    """Checkpoint names a model type leaves unused on purpose (listed as ignored, not unexpected)."""
    return mtp_ignore_patterns(config) if config.get("model_type") == "deepseek_v3" else ()


def supported_model_types() -> tuple[str, ...]:
    return DENSE_TYPES + MOE_TYPES


def build_model(config: Mapping, *, tp: int = 1, tp_rank: int = 0, ops: Collectives = SOLO,
                pipe: PipeOps = SINGLE_STAGE, layers: range | None = None,
                dtype: torch.dtype | None = None, device: torch.device | str = "meta") -> nn.Module:
    """Builds the reference model for ``config['model_type']`` with this rank's shapes.

    Example:
        >>> m = build_model({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 16,
        ...                  "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> m.model.layers["0"].self_attn.qkv_proj.bias.shape
        torch.Size([48])

    Raises:
        ConfigError: the model type is unknown (the message lists the supported ones).
        PlanError: a size does not split over ``tp``.
    """
    model_type = config.get("model_type")
    if model_type in MOE_TYPES:
        raise ConfigError(f"model_type {model_type!r} is a mixture of experts: build it with reference_model, "
                          "which knows the layout's expert groups")
    if model_type not in DENSE_TYPES:
        raise ConfigError(f"config.json model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(supported_model_types())})")
    return DecoderForCausalLM(DecoderConfig.from_json(config), tp=tp, tp_rank=tp_rank, ops=ops, pipe=pipe,
                              layers=layers, dtype=dtype, device=device)
