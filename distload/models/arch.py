"""What a builder is given (``BuildContext``) and what distload knows about one model type
(``Architecture``): its config reader, builder, ignore rules, experts and per-type knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn

from ..comm import SINGLE_STAGE, SOLO, Collectives, PipeOps
from ..experts import ExpertFacts, ExpertPlan
from ..layout import Layout
from ..quant.config import QuantConfig
from .config import DecoderTraits


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
    experts: ExpertPlan | None = None
    """each MoE layer's expert placement (``load`` makes it from the options and ``--expert-map``);
    None: linear, no redundant experts"""
    device: str = "meta"
    """build here; ``load`` materializes on the rank's device afterwards"""
    quant: QuantConfig = QuantConfig()
    """the checkpoint's quantization: a scheme may fix how a layer splits before it is built
    (``QuantConfig.feature_block``); the layers are quantized after building"""
    tensor_names: Collection[str] = ()
    """the checkpoint's tensor names (where an unregistered multimodal wrapper's language model
    sits is read from them)"""


ModelBuilder = Callable[[BuildContext], nn.Module]
"""makes one rank's model from a BuildContext"""


def no_ignores(config: Mapping) -> tuple[str, ...]:
    """The ignore rules of a model type whose checkpoints hold nothing it leaves unused."""
    return ()


def no_notes(config: Mapping) -> tuple[str, ...]:
    """The report notes of a model type that loads all of its checkpoint's model."""
    return ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Architecture:
    """One model type, described once: shared code asks this, never the ``model_type`` string.

    A new architecture is its file (reader, builder, this description) and one
    ``register`` line in ``registry.py``.
    """

    model_type: str
    """config.json's ``model_type``"""
    decoder: DecoderTraits
    """its attention and MLP knobs (biases, q/k norm, sliding windows), read by ``DecoderConfig``"""
    read: Callable[[Mapping, "Architecture"], Any]
    """the typed config reader: checks every field the builder uses (raises ConfigError)"""
    build: Callable[[Any, BuildContext], nn.Module]
    """makes one rank's model from the read config and the context"""
    experts: Callable[[Any], ExpertFacts | None] | None = None
    """the experts of the read config (count, layers with experts; None from it: this config has
    none); None: a dense model"""
    expert_keys: tuple[str, ...] = ()
    """config.json keys of the expert count, the first preferred (several present must agree)"""
    block: Any = None
    """the sparse feed-forward's names and rules, for readers that take them (``moe.SparseBlock``)"""
    ignores: Callable[[Mapping], tuple[str, ...]] = no_ignores
    """checkpoint-name patterns it leaves unused on purpose (listed as ignored, not unexpected)"""
    notes: Callable[[Mapping], tuple[str, ...]] = no_notes
    """report notes on what it loads (a multimodal wrapper: which part of the checkpoint)"""
    text_key: str | None = None
    """config.json key of the nested decoder config (a multimodal wrapper's ``text_config``);
    None: config.json itself describes the decoder"""
    for_names: Callable[[Collection[str]], "Architecture"] | None = None
    """the description for a checkpoint of these tensor names (a registered multimodal wrapper: of
    the layout they show); None: this one for every checkpoint"""
