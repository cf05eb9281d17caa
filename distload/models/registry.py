"""model_type -> its Architecture: one ``register`` line per model type; shared code asks here."""

from __future__ import annotations

import dataclasses
import re
from typing import Collection, Iterable, Mapping

import torch
from torch import nn

from ..comm import SOLO, Collectives
from ..errors import ConfigError
from ..experts import ExpertFacts, ExpertPlan
from ..layout import Layout
from .arch import Architecture, BuildContext, ModelBuilder
from .deepseek import DEEPSEEK_V3
from .fields import Fields
from .gpt_oss import GPT_OSS
from .llama4 import LLAMA4_TEXT
from .gemma3 import GEMMA3_TEXT
from .llama import LLAMA, MISTRAL, QWEN2, QWEN3
from .moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from .phi3 import PHI3
from .unregistered import find
from .wrapper import GEMMA3, LLAMA4, wrapped

__all__ = ["Architecture", "BuildContext", "ModelBuilder", "architecture", "build_model", "check_config",
           "default_ignores", "expert_facts", "model_notes", "reference_model", "register", "supported_model_types"]

ARCHITECTURES: dict[str, Architecture] = {}
"""model_type -> its description, in registration order"""


def register(arch: Architecture) -> None:
    """Makes ``arch`` the reference model of its ``model_type`` (each type is registered once)."""
    assert arch.model_type not in ARCHITECTURES, f"model_type {arch.model_type!r} registered twice"
    ARCHITECTURES[arch.model_type] = arch


register(LLAMA)
register(MISTRAL)
register(QWEN2)
register(QWEN3)
register(MIXTRAL)
register(QWEN2_MOE)
register(QWEN3_MOE)
register(DEEPSEEK_V3)
register(PHI3)
register(GPT_OSS)
register(LLAMA4_TEXT)
register(GEMMA3_TEXT)
register(wrapped(GEMMA3, ARCHITECTURES.get))
register(wrapped(LLAMA4, ARCHITECTURES.get))  # its decoder: llama4_text, above


def supported_model_types() -> tuple[str, ...]:
    """The model types distload has a reference model for."""
    return tuple(ARCHITECTURES)


def architecture(config: Mapping, tensor_names: Collection[str] = ()) -> Architecture:
    """The description of ``config['model_type']``: a registered one, or an unregistered multimodal
    wrapper around a built-in decoder (``unregistered.find``, where ``tensor_names`` show its layout).

    Raises:
        ConfigError: the model type is unknown (the message lists the built-in ones, says why its
            ``text_config`` does not help where it has one, and names rules mode).
    """
    arch = _known(config, tensor_names)
    if arch is None:
        why = find(config, tensor_names, _decoder).why
        raise ConfigError(f"config.json model_type {config.get('model_type')!r} has no built-in model{why} (built in: "
                          f"{', '.join(supported_model_types())}); to load it anyway, give a rules file saying how "
                          "its tensors split: --rules rules.json, or LoadConfig(rules=...)")
    return arch


def _decoder(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def _known(config: Mapping, tensor_names: Collection[str] = ()) -> Architecture | None:
    """The description of ``config['model_type']``; None for a type without a reference model."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is not None and arch.for_names is not None:
        return arch.for_names(tensor_names)
    return arch if arch is not None else find(config, tensor_names, _decoder).arch


def reference_model(ctx: BuildContext) -> nn.Module:
    """The default builder: the registered architecture of the config's ``model_type``
    (a mixture of experts without ``ctx.experts`` gets the linear placement)."""
    arch = architecture(ctx.config, ctx.tensor_names)
    cfg = arch.read(ctx.config, arch)
    facts = arch.experts(cfg) if arch.experts is not None else None
    if facts is not None and ctx.experts is None:
        ctx = dataclasses.replace(ctx, experts=ExpertPlan.make(num_experts=facts.num_experts, ep=ctx.layout.ep))
    return arch.build(cfg, ctx)


def default_ignores(config: Mapping, tensor_names: Collection[str] = ()) -> tuple[str, ...]:
    """Checkpoint names a model type leaves unused on purpose (listed as ignored, not unexpected)."""
    arch = _known(config, tensor_names)
    return () if arch is None else arch.ignores(config)


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


def check_config(config: Mapping, tensor_names: Collection[str]) -> None:
    """Reads ``config`` as the reference model of its type will, before any layer is built, and
    bounds its layer count by the checkpoint: at most twice the layers ``tensor_names`` hold
    (one past their largest layer index). Fewer present than configured is a missing finding;
    a layer the model ignores (DeepSeek-V3's MTP layer, at index ``num_hidden_layers``) only
    raises the bound.

    A model type without a reference model is left to its builder.

    Raises:
        ConfigError: naming the field and its value, or the checkpoint's largest layer index.
    """
    arch = _known(config, tensor_names)
    if arch is None:
        return
    key = arch.text_key  # a multimodal wrapper's layers are its decoder's
    decoder, prefix = (config, "") if key is None else (config.get(key), f"{key}.")
    if not isinstance(decoder, Mapping):
        arch.read(config, arch)  # names what is wrong with it
    layers = Fields(decoder, prefix=prefix).integer("num_hidden_layers")
    top = largest_layer_index(tensor_names)
    # a short checkpoint (its last layers lost) is a missing finding; a count far beyond what it
    # holds is a config.json that does not describe it, and building that many layers costs minutes
    if layers > 2 * (top + 1):
        held = (f"more than twice the {top + 1} layers the checkpoint has tensors for (its largest layer index "
                f"is {top}): this config.json does not describe the checkpoint" if top >= 0
                else "but the checkpoint holds no layer tensors (no name has layers.<i>.)")
        raise ConfigError(f"config.json {prefix}num_hidden_layers is {layers}, {held}")
    arch.read(config, arch)
    arch.ignores(config)


def expert_facts(config: Mapping, tensor_names: Collection[str] = ()) -> ExpertFacts | None:
    """The experts of ``config``'s model type (read from its own config key), or None for a dense
    model or one without a reference model.

    Raises:
        ConfigError: naming a bad field.
    """
    arch = _known(config, tensor_names)
    if arch is None or arch.experts is None:
        return None
    return arch.experts(arch.read(config, arch))


def model_notes(config: Mapping, tensor_names: Collection[str] = ()) -> tuple[str, ...]:
    """What the report says about the model loaded (a multimodal wrapper: which part); () for a
    model type without a reference model."""
    arch = _known(config, tensor_names)
    return () if arch is None else arch.notes(config)


def build_model(config: Mapping, *, tp: int = 1, tp_rank: int = 0, ops: Collectives = SOLO,
                dtype: torch.dtype | None = None, device: torch.device | str = "meta",
                tensor_names: Collection[str] = ()) -> nn.Module:
    """Builds the reference model for ``config['model_type']`` as TP rank ``tp_rank`` of one
    replica (no pipeline stages; a mixture of experts with every expert, placed linearly);
    ``tensor_names`` (the checkpoint's) show a multimodal wrapper's layout. An unregistered wrapper
    needs them; without them a registered one (``gemma3``, ``llama4``) is built in transformers 5's
    layout (``language_model.*``), by design: a load always passes the checkpoint's names.

    Example:
        >>> m = build_model({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 16,
        ...                  "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> m.model.layers["0"].self_attn.qkv_proj.bias.shape
        torch.Size([48])

    Raises:
        ConfigError: the model type is unknown (the message lists the supported ones), a bad field,
            or ``tensor_names`` that fit more than one wrapper layout or mix two.
        PlanError: a size does not split over ``tp``.
    """
    return reference_model(BuildContext(config=config, tp=tp, tp_rank=tp_rank, ops=ops, dtype=dtype,
                                        layout=Layout(world_size=tp, tp=tp), rank=tp_rank, device=device,
                                        tensor_names=tensor_names))
