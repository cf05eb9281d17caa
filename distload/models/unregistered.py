"""Unregistered multimodal wrappers: a config.json whose ``model_type`` has no built-in model but
whose ``text_config`` names a built-in decoder (LLaVA and its like around a ``llama``, ``mistral``
or ``qwen2`` decoder) loads that language model as a registered ``Wrapper`` does.

Where the language model sits is read from the checkpoint's tensor names, among the layouts
transformers writes for such models, never guessed from the model type. Every other tensor (the
vision tower, the projector, whatever else the wrapper has) is ignored with a rule per part: nothing
checks that part, and the report note says so.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from ..jsondoc import quoted, show
from .arch import Architecture
from .layouts import EMBEDDING, LAYOUTS, fit, head_tensor, head_tied
from .wrapper import Wrapper, wrapped


@dataclass(frozen=True, kw_only=True, slots=True)
class Found:
    """What the lookup made of a config.json whose model type is not registered."""

    arch: Architecture | None
    """the language model's wrapper architecture; None: it cannot be loaded this way"""
    why: str
    """why not, as a clause of the unknown model type's error ("": found, or config.json has no text_config)"""


KEY = "text_config"
"""config.json key of the nested decoder config"""


def find(config: Mapping, tensor_names: Collection[str], decoders: Callable[[str], Architecture | None]) -> Found:
    """The wrapper architecture of an unregistered model type around a built-in decoder, with the
    layout its checkpoint's names show.

    Args:
        config: config.json, whose ``model_type`` is not registered.
        tensor_names: every tensor name of the checkpoint.
        decoders: model type -> its registered architecture (None: not registered).
    """
    text = config.get(KEY)
    if not isinstance(text, Mapping):
        return Found(arch=None, why="")
    text_type = text.get("model_type")
    inner = decoders(text_type) if isinstance(text_type, str) else None
    if inner is None or inner.text_key is not None:
        named = quoted(text_type) if isinstance(text_type, str) else show(text_type)
        return Found(arch=None, why=f", and its {KEY}.model_type {named} is no language model distload builds")
    if not tensor_names:  # build_model(config) without tensor_names=...
        return Found(arch=None, why=f"; its {KEY} (model_type {quoted(text_type)}) is built in, but no checkpoint "
                                    "tensor names were given to read where its language model sits (build_model "
                                    "takes them: tensor_names=...)")
    found = fit(tensor_names)
    if found.layout is None:
        return Found(arch=None, why=f"; its {KEY} (model_type {quoted(text_type)}) is built in, but {found.why}")
    layout = found.layout
    model_type = config.get("model_type")
    shown = quoted(model_type) if isinstance(model_type, str) else show(model_type)
    starts = layout.starts
    parts = other_parts(tensor_names, starts)
    # where neither config level says, the checkpoint does (transformers' defaults differ by wrapper
    # class): only the embedding is tied, a head tensor untied
    tied = head_tied(layout, tensor_names)
    held = head_tensor(layout, tensor_names)
    head, embedding = quoted(layout.head + "*"), quoted(layout.checkpoint_name(EMBEDDING))
    because = (f"holds {quoted(held)}" if held is not None else f"holds {embedding} and no {head} tensor" if tied
               else f"holds no {head} tensor and no {embedding} to tie it to")
    arch = wrapped(Wrapper(model_type=str(model_type), text_model_type=text_type, layout=layout, ignored_parts=parts,
                           tie_word_embeddings=tied, tie_from_text=True), decoders)
    where = " and ".join(map(quoted, starts))

    def notes(config: Mapping) -> tuple[str, ...]:
        others = ", ".join(what for what, _ in parts) or "none"
        said = any("tie_word_embeddings" in c for c in (config, config[KEY]))
        tying = "" if said else (f"; config.json sets no tie_word_embeddings, so the head is "
                                 f"{'tied' if tied else 'untied'}, as the checkpoint {because}")
        return (f"loaded the language model through the generic path for an unregistered wrapper type: model_type "
                f"{shown} has no registered wrapper, its {KEY} (model_type {quoted(text_type)}) was read as the "
                f"decoder, checkpoint names under {where} (the layout {layout.writers} write){tying}; nothing checked "
                f"the other parts ({others}), which are ignored",)

    return Found(arch=dataclasses.replace(arch, notes=notes), why="")


def other_parts(tensor_names: Collection[str], starts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The parts outside the language model (``vision_tower.``, ``model.multi_modal_projector.``),
    each with the rule that ignores it, in name order.

    A part is the shortest dotted start of a name that does not begin any language-model start nor
    where any layout puts the head (``model.`` begins ``model.language_model.``: ``model.vision_tower.``
    is the part); a name with no such start is a part of its own (``image_newline``). No rule covers
    a head name: a head is never ignored (``fit`` refuses one where another layout puts it).
    """
    kept = (*starts, *(layout.head for layout in LAYOUTS))
    parts: dict[str, str] = {}
    for name in sorted(tensor_names):
        if name.startswith(kept):
            continue
        pieces = name.split(".")
        for i in range(1, len(pieces)):
            start = ".".join(pieces[:i]) + "."
            if not any(s.startswith(start) for s in kept):
                parts.setdefault(start, f"^{re.escape(start)}")
                break
        else:
            parts.setdefault(name, f"^{re.escape(name)}$")
    return tuple(parts.items())
