"""Where a multimodal checkpoint puts its language model's tensors beside the other parts: the
layouts transformers writes, and which of them a checkpoint's tensor names show.

Registered wrappers (``wrapper.py``) and the generic path for unregistered ones
(``unregistered.py``) both read the layout from here, never from the model type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection


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

HEAD = "lm_head.weight"
"""every built-in decoder's own name of its LM head"""
EMBEDDING = "model.embed_tokens.weight"
"""every built-in decoder's own name of its token embedding"""


def fitting(tensor_names: Collection[str]) -> tuple[TextLayout, ...]:
    """The layouts whose language-model body starts one of ``tensor_names``."""
    return tuple(layout for layout in LAYOUTS if any(name.startswith(layout.body) for name in tensor_names))


def layout_of(tensor_names: Collection[str]) -> TextLayout:
    """The layout ``tensor_names`` show, for a registered wrapper: the one they fit, else
    transformers 5's (none fits: no names given, or the body lost, which then shows as missing)."""
    fits = fitting(tensor_names)
    return fits[0] if len(fits) == 1 else LAYOUTS[0]


def head_tied(layout: TextLayout, tensor_names: Collection[str]) -> bool:
    """Whether the checkpoint's LM head is its embedding, as its tensors show: it holds the
    embedding but no head tensor."""
    names = set(tensor_names)
    return layout.checkpoint_name(HEAD) not in names and layout.checkpoint_name(EMBEDDING) in names
