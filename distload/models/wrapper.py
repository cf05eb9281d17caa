"""Multimodal wrappers: a model type whose config.json nests its decoder under ``text_config``
(``gemma3``, ``llama4``) and whose checkpoint puts the decoder's tensors under a prefix beside a
vision tower and a projector.

distload loads the language model: the decoder the text config names is read and built as
usual, inside modules at the paths the checkpoint's layout puts its parts (``layouts.py``, read
from the tensor names), so every parameter, unit and quantization target carries the
checkpoint's own full name. The vision tower and the projector are listed
under ``ignored``, each with the rule that ignored it, and the report says which part was loaded.
A new wrapper is one ``Wrapper`` value and its ``register(wrapped(...))`` line in registry.py; a
model type without one, around a built-in decoder, is loaded through ``unregistered.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..jsondoc import quoted, show
from ..layers.embedding import ParallelLMHead
from ..spec import sibling
from .arch import Architecture, BuildContext
from .config import DecoderTraits
from .layouts import LAYOUTS, TextLayout, layout_of


@dataclass(frozen=True, kw_only=True, slots=True)
class Wrapper:
    """What a multimodal model type puts around the decoder it nests."""

    model_type: str
    """config.json's ``model_type`` (``gemma3``)"""
    text_model_type: str
    """the decoder's model type when ``text_config`` names none (``gemma3_text``)"""
    ignored_parts: tuple[tuple[str, str], ...]
    """(what it is, the anchored regex of its checkpoint names) for each part that is not the language
    model; a registered wrapper's in transformers 5's names (``layout`` None), moved per layout"""
    tie_word_embeddings: bool
    """whether the LM head is the embedding when config.json's top level does not say (the
    wrapper's transformers class reads the top level's, not text_config's)"""
    text_key: str = "text_config"
    """config.json key of the nested decoder config"""
    layout: TextLayout | None = None
    """where the checkpoint puts the language model; None: the layout its tensor names show"""
    tie_from_text: bool = False
    """the LM head is also tied when ``text_config`` says so and the top level does not (transformers'
    LLaVA-style config classes forward the text config's ``tie_word_embeddings`` to the top level),
    and ``tie_word_embeddings`` is the default only when neither says"""

    def at(self, layout: TextLayout) -> Wrapper:
        """This wrapper in ``layout``, its parts' rules moved to where that layout puts them."""
        parts = tuple((what, layout.other_rule(pattern)) for what, pattern in self.ignored_parts)
        return dataclasses.replace(self, layout=layout, ignored_parts=parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class WrappedConfig:
    """A wrapper's config.json, read: the decoder's own read config and where it came from."""

    inner: Architecture
    """the decoder's architecture"""
    text: Mapping
    """the decoder's config (``text_config``, with the top level's ``tie_word_embeddings``)"""
    decoder: Any
    """what ``inner.read`` made of ``text``"""


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Adds ``module`` to ``root`` at the dotted ``path``, with empty modules as the holders on the way."""
    *outer, last = path.split(".")
    holder = root
    for name in outer:
        if not hasattr(holder, name):
            holder.add_module(name, nn.Module())
        holder = getattr(holder, name)
    holder.add_module(last, module)


class LanguageModelOf(nn.Module):
    """Holds a decoder at the module path of the checkpoint's prefix (``language_model``), so its
    parameters are named as the checkpoint names them; forward is the decoder's."""

    def __init__(self, prefix: str, decoder: nn.Module) -> None:
        super().__init__()
        _place(self, prefix.rstrip("."), decoder)
        self.decoder_path = prefix.rstrip(".")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.get_submodule(self.decoder_path)(input_ids)


class RenamedDecoder(nn.Module):
    """Holds each top-level part of a decoder at the checkpoint's path for it (its ``model`` at
    ``model.language_model``, its ``lm_head`` at ``lm_head``), so its parameters are named as the
    checkpoint names them; forward is the decoder's, which holds the same parts."""

    def __init__(self, renames: tuple[tuple[str, str], ...], decoder: nn.Module) -> None:
        super().__init__()
        places = {own.rstrip("."): theirs.rstrip(".") for own, theirs in renames}
        # every built-in decoder holds only its body and its head (config.json cannot add a part)
        stray = [n for n, _ in decoder.named_children() if n not in places]
        stray += [n for n, _ in (*decoder.named_parameters(recurse=False), *decoder.named_buffers(recurse=False))]
        assert not stray, f"the decoder's {stray[0]!r} has no place in the layout (it places {', '.join(places)})"
        for own, part in decoder.named_children():
            _place(self, places[own], part)
        for path, module in decoder.named_modules():  # a tied head names the embedding beside it
            if isinstance(module, ParallelLMHead) and module.tied_name:
                module.tied_name = _beside(_renamed(places, path), _renamed(places, sibling(path, module.tied_name)))
        self.__dict__["decoder"] = decoder  # not a child: its parts are named by their places above

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.decoder(input_ids)


def _renamed(places: Mapping[str, str], name: str) -> str:
    """A decoder name at its checkpoint place (``model.norm.weight`` -> ``model.language_model.norm.weight``)."""
    own, dot, rest = name.partition(".")
    return places[own] + dot + rest


def _beside(path: str, name: str) -> str:
    """``name`` as seen beside the module at ``path`` (what ``spec.sibling`` turns back into ``name``)."""
    parent = path.rpartition(".")[0]
    # the layouts keep a head beside its embedding's holder (a top-level lm_head has no parent)
    assert not parent or name.startswith(parent + "."), f"the tied head at {path!r} cannot name {name!r}"
    return name[len(parent) + 1:] if parent else name


def _in_text_config(err: ConfigError, key: str) -> ConfigError:
    """The decoder's reader names fields of config.json; they are fields of its ``key`` object."""
    message = err.message
    lead = "config.json "
    message = f"config.json {key}: {message[len(lead):]}" if message.startswith(lead) else f"{message} (in {key})"
    return ConfigError(message, file=err.file)


def wrapped(wrapper: Wrapper, decoders: Callable[[str], Architecture | None]) -> Architecture:
    """The ``Architecture`` of a multimodal model type: reads, builds and ignores for its decoder.

    Args:
        wrapper: the wrapper's facts; without a ``layout``, its ``for_names`` gives the architecture
            of the layout a checkpoint's tensor names show (``layout_of``; itself: transformers 5's),
            and raises ConfigError for names of two layouts.
        decoders: model type -> its registered architecture (None: not registered), asked when a
            config is read, so the decoder may be registered after the wrapper.
    """
    if wrapper.layout is None:
        each = {layout: _in_layout(wrapper.at(layout), decoders) for layout in LAYOUTS}
        return dataclasses.replace(each[LAYOUTS[0]], for_names=lambda names: each[layout_of(names, wrapper.model_type)])
    return _in_layout(wrapper, decoders)


def _in_layout(wrapper: Wrapper, decoders: Callable[[str], Architecture | None]) -> Architecture:
    """``wrapped`` for a wrapper whose layout is known."""
    layout = wrapper.layout

    def text_of(config: Mapping) -> tuple[Architecture, Mapping]:
        key = wrapper.text_key
        text = config.get(key)
        if not isinstance(text, Mapping):
            raise ConfigError(f"config.json {key} must be an object (the language model's config, which "
                              f"model_type {quoted(wrapper.model_type)} nests), got {show(text)}")
        text_type = text.get("model_type", wrapper.text_model_type)
        inner = decoders(text_type) if isinstance(text_type, str) else None
        if inner is None or inner.text_key is not None:
            named = quoted(text_type) if isinstance(text_type, str) else show(text_type)
            raise ConfigError(f"config.json {key}.model_type {named} is not a language model distload "
                              f"builds, so model_type {quoted(wrapper.model_type)} cannot be loaded "
                              f"(it expects {quoted(wrapper.text_model_type)})")
        own = text.get("tie_word_embeddings") if wrapper.tie_from_text else None
        tie = config.get("tie_word_embeddings", wrapper.tie_word_embeddings if own is None else own)
        if wrapper.tie_from_text and tie is False and text.get("tie_word_embeddings") is True:
            tie = True
        return inner, {**text, "model_type": text_type, "tie_word_embeddings": tie}

    def read(config: Mapping, arch: Architecture) -> WrappedConfig:
        inner, text = text_of(config)
        try:
            return WrappedConfig(inner=inner, text=text, decoder=inner.read(text, inner))
        except ConfigError as err:
            raise _in_text_config(err, wrapper.text_key) from None

    def build(cfg: WrappedConfig, ctx: BuildContext) -> nn.Module:
        decoder = cfg.inner.build(cfg.decoder, dataclasses.replace(ctx, config=cfg.text))
        return LanguageModelOf(layout.prefix, decoder) if layout.prefix else RenamedDecoder(layout.places, decoder)

    def experts(cfg: WrappedConfig):
        return cfg.inner.experts(cfg.decoder) if cfg.inner.experts is not None else None

    def ignores(config: Mapping) -> tuple[str, ...]:
        inner, text = text_of(config)
        try:
            own = inner.ignores(text)
        except ConfigError as err:
            raise _in_text_config(err, wrapper.text_key) from None
        return tuple(pattern for _, pattern in wrapper.ignored_parts) + tuple(map(layout.decoder_rule, own))

    def notes(config: Mapping) -> tuple[str, ...]:
        parts = " and ".join(f"the {what} ({pattern})" for what, pattern in wrapper.ignored_parts)
        text_type = config[wrapper.text_key].get("model_type", wrapper.text_model_type)
        return (f"loaded the language model of model_type {quoted(wrapper.model_type)}: {wrapper.text_key} "
                f"(model_type {quoted(text_type)}), checkpoint names under "
                f"{' and '.join(map(quoted, layout.starts))}; "
                f"{parts} are ignored",)

    return Architecture(model_type=wrapper.model_type, decoder=DecoderTraits(qkv_bias=None), read=read, build=build,
                        experts=experts, ignores=ignores, notes=notes, text_key=wrapper.text_key)


GEMMA3 = Wrapper(model_type="gemma3", text_model_type="gemma3_text",
                 ignored_parts=(("vision tower", r"^vision_tower\."),
                                ("multimodal projector", r"^multi_modal_projector\.")),
                 tie_word_embeddings=True)
"""Gemma 3 4B and larger: a SigLIP vision tower and a projector beside the text model"""

LLAMA4 = Wrapper(model_type="llama4", text_model_type="llama4_text",
                 ignored_parts=(("vision model", r"^vision_model\."),
                                ("multimodal projector", r"^multi_modal_projector\.")),
                 tie_word_embeddings=False)
"""Llama 4 Scout and Maverick: a vision model and a projector beside the text model"""
