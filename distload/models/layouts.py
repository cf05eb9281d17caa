"""Where a multimodal checkpoint puts its language model's tensors beside the other parts: the
layouts transformers writes, and which of them a checkpoint's tensor names show.

Registered wrappers (``wrapper.py``) and the generic path for unregistered ones
(``unregistered.py``) both read the layout from here, never from the model type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection

from ..errors import ConfigError
from ..jsondoc import quoted


@dataclass(frozen=True, kw_only=True, slots=True)
class TextLayout:
    """Where a checkpoint puts its language model's tensors beside the other parts."""

    places: tuple[tuple[str, str], ...]
    """(the start of the decoder's own names, the checkpoint's for them); the first is its body"""
    prefix: str = ""
    """what the checkpoint puts before every decoder name, when that is all it does; "": it moves
    the decoder's parts apart (``places``)"""
    others: str = ""
    """what the checkpoint puts before a wrapper's other parts (``model.``: ``model.vision_tower.*``)"""
    writers: str
    """which transformers versions write it"""

    @property
    def body(self) -> str:
        """The checkpoint's start of the decoder's ``model.*`` names: a name under it picks the layout."""
        return self.places[0][1]

    @property
    def head(self) -> str:
        """The checkpoint's start of the LM head's names: any name under it is the head (a quantized
        head has no ``lm_head.weight``, but ``lm_head.qweight`` or ``lm_head.weight_packed``)."""
        return self.checkpoint_name(HEAD)

    @property
    def starts(self) -> tuple[str, ...]:
        """The starts of every language-model name in the checkpoint."""
        return (self.prefix,) if self.prefix else tuple(theirs for _, theirs in self.places)

    def checkpoint_name(self, own: str) -> str:
        """The checkpoint's name of the decoder's ``own`` (``lm_head.weight`` -> ``lm_head.weight``)."""
        if self.prefix:
            return self.prefix + own
        return next((theirs + own[len(mine):] for mine, theirs in self.places if own.startswith(mine)), own)

    def decoder_rule(self, pattern: str) -> str:
        """A decoder's ignore rule for the checkpoint's names: an anchored rule moves with the part
        it names; an unanchored one matches anywhere already."""
        if not pattern.startswith("^"):
            return pattern
        for own, theirs in ((("", self.prefix),) if self.prefix else self.places):
            if pattern[1:].startswith(re.escape(own)):
                return f"^{re.escape(theirs)}{pattern[1 + len(re.escape(own)):]}"
        return pattern

    def other_rule(self, pattern: str) -> str:
        """A wrapper part's anchored rule, given in transformers 5's names (``^vision_tower\\.``),
        for where this layout puts that part (``^model\\.vision_tower\\.``)."""
        assert pattern.startswith("^"), pattern  # a registered wrapper's parts are anchored
        return f"^{re.escape(self.others)}{pattern[1:]}"


LAYOUTS = (
    TextLayout(places=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
               prefix="language_model.", writers="transformers 5 and before 4.52"),
    TextLayout(places=(("model.", "model.language_model."), ("lm_head.", "lm_head.")), others="model.",
               writers="transformers 4.52 to 4.57"),
)
"""the LLaVA-style layouts: ``language_model.`` before the decoder's own names, or its body moved to
``model.language_model.``, its head left at the top level and the other parts under ``model.``
(transformers' ``llava`` conversion mapping, which Gemma 3 shares)"""

HEAD = "lm_head."
"""every built-in decoder's own start of its LM head's names"""
EMBEDDING = "model.embed_tokens.weight"
"""every built-in decoder's own name of its token embedding"""
LOOKED_FOR = " or ".join(f"{', '.join(theirs + '*' for _, theirs in layout.places)} ({layout.writers})"
                         for layout in LAYOUTS)
"""the layouts, as an error lists them"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Fit:
    """The one layout a checkpoint's tensor names show, or why they show none."""

    layout: TextLayout | None
    """the layout; None: they fit no layout, more than one, or mix two"""
    why: str
    """why not, as a clause ("the checkpoint's names fit none of ..."); empty: found"""


def fitting(tensor_names: Collection[str]) -> tuple[TextLayout, ...]:
    """The layouts whose language-model body starts one of ``tensor_names``."""
    return tuple(layout for layout in LAYOUTS if any(name.startswith(layout.body) for name in tensor_names))


def fit(tensor_names: Collection[str]) -> Fit:
    """The one layout ``tensor_names`` show: exactly one layout's body starts some of them, and no
    name sits where another layout puts the head (ignored, or read as no head, such a head would
    load a wrong model that passes every check)."""
    fits = fitting(tensor_names)
    if len(fits) != 1:
        held = "none" if not fits else "more than one"
        return Fit(layout=None, why=f"the checkpoint's names fit {held} of the layouts looked for: {LOOKED_FOR}")
    layout = fits[0]
    for other in (other for other in LAYOUTS if other is not layout):
        stray = min((n for n in tensor_names if n.startswith(other.head) and not n.startswith(layout.starts)),
                    default=None)
        if stray is not None:
            body = min(n for n in tensor_names if n.startswith(layout.body))
            return Fit(layout=None, why=f"the checkpoint's names mix two layouts: {quoted(body)} is where "
                                        f"{layout.writers} put the language model, and {quoted(stray)} where "
                                        f"{other.writers} put its head")
    return Fit(layout=layout, why="")


def layout_of(tensor_names: Collection[str], model_type: str) -> TextLayout:
    """The layout ``tensor_names`` show, for the registered wrapper ``model_type``: the one they
    fit, else transformers 5's where no layout's body starts any of them (no names given:
    ``build_model``'s default; or the body lost, which then shows as missing).

    Raises:
        ConfigError: they fit more than one layout, or mix two (``fit``).
    """
    if not fitting(tensor_names):
        return LAYOUTS[0]
    found = fit(tensor_names)
    if found.layout is None:
        raise ConfigError(f"config.json model_type {quoted(model_type)}: {found.why}")
    return found.layout


def head_tensor(layout: TextLayout, tensor_names: Collection[str]) -> str | None:
    """The checkpoint's first LM head tensor in ``layout`` (in name order); None: it holds none."""
    return min((name for name in tensor_names if name.startswith(layout.head)), default=None)


def head_tied(layout: TextLayout, tensor_names: Collection[str]) -> bool:
    """Whether the checkpoint's LM head is its embedding, as its tensors show: it holds the
    embedding but no head tensor."""
    return head_tensor(layout, tensor_names) is None and layout.checkpoint_name(EMBEDDING) in tensor_names
