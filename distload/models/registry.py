"""model_type -> reference model builder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..comm import SINGLE_STAGE, SOLO, Collectives, PipeOps
from ..layout import Layout
from ..errors import ConfigError
from ..experts import ExpertFacts
from .config import DecoderConfig
from ..layers.moe import ExpertExchange
from .llama import DecoderForCausalLM
from .deepseek import DeepseekConfig, build_deepseek_model, mtp_ignore_patterns
from .fields import Fields
from .moe import MoEConfig, build_moe_model

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
        layers = ctx.layout.stage_layers(Fields(ctx.config).integer("num_hidden_layers"), ctx.stage)
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


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")
"""a decoder layer's index in a checkpoint name (``model.layers.5.mlp...``); longer numbers are no layer"""


def largest_layer_index(names: Iterable[str]) -> int:
    """The largest ``layers.<i>.`` index among checkpoint tensor names; -1 when none has one."""
    top = -1
    for name in names:
        found = LAYER_INDEX.search(name)
        if found is not None:
            top = max(top, int(found.group(1)))
    return top


def check_config(config: Mapping, tensor_names: Iterable[str]) -> None:
    """Reads ``config`` as the reference model of its type will, before any layer is built, and
    bounds its layer count by the checkpoint: at most twice the layers ``tensor_names`` hold
    (one past their largest layer index). Fewer present than configured is a missing finding;
    DeepSeek-V3's MTP layer, at index ``num_hidden_layers``, only raises the bound.

    A model type without a reference model is left to its builder.

    Raises:
        ConfigError: naming the field and its value, or the checkpoint's largest layer index.
    """
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        return
    layers = Fields(config).integer("num_hidden_layers")
    top = largest_layer_index(tensor_names)
    # a short checkpoint (its last layers lost) is a missing finding; a count far beyond what it
    # holds is a config.json that does not describe it, and building that many layers costs minutes
    if layers > 2 * (top + 1):
        held = (f"more than twice the {top + 1} layers the checkpoint has tensors for (its largest layer index "
                f"is {top}): this config.json does not describe the checkpoint" if top >= 0
                else "but the checkpoint holds no layer tensors (no name has layers.<i>.)")
        raise ConfigError(f"config.json num_hidden_layers is {layers}, {held}")
    if model_type == "deepseek_v3":
        DeepseekConfig.from_json(config)
        mtp_ignore_patterns(config)
        return
    DecoderConfig.from_json(config)
    if model_type in MOE_TYPES:
        MoEConfig.from_json(config)


def expert_facts(config: Mapping) -> ExpertFacts | None:
    """The experts of ``config``'s model type (read from its own config key), or None for a dense model.

    Raises:
        ConfigError: naming a bad field.
    """
    model_type = config.get("model_type")
    if model_type == "deepseek_v3":
        ds = DeepseekConfig.from_json(config)
        layers = ds.dense.num_hidden_layers
        return ExpertFacts(num_experts=ds.num_experts, num_layers=layers,
                           sparse_layers=frozenset(range(ds.first_dense, layers)))
    if model_type in MOE_TYPES:
        moe = MoEConfig.from_json(config)
        return ExpertFacts(num_experts=moe.num_experts, num_layers=Fields(config).integer("num_hidden_layers"),
                           sparse_layers=moe.sparse_layers)
    return None


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
