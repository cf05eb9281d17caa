"""The rules file (``--rules rules.json``, ``LoadConfig(rules=...)``): checkpoint-name patterns and how
each tensor they match splits over the ranks, read and checked on its own, before any checkpoint
is opened. ``bind`` matches it against a checkpoint.

A document::

    {"rules": [
       {"pattern": "transformer\\\\.h\\\\.(?P<layer>\\\\d+)\\\\.attn\\\\.c_attn\\\\.weight",
        "split": {"dim": 1, "parts": [768, 768, 768]}},
       {"pattern": "transformer\\\\.wte\\\\.weight", "split": {"dim": 0, "pad": true}},
       {"pattern": "transformer\\\\.h\\\\.(?P<layer>\\\\d+)\\\\.ln_1\\\\.(weight|bias)"},
       {"pattern": "model\\\\.layers\\\\.(?P<layer>\\\\d+)\\\\.experts\\\\.(?P<expert>\\\\d+)\\\\.w1\\\\.weight",
        "split": {"dim": 0}},
       {"names": ["model.k_scale"], "shape": [], "optional": {"default": 1.0}}],
     "ignore": ["transformer\\\\.h\\\\.\\\\d+\\\\.attn\\\\.bias"],
     "num_layers": "n_layer", "num_experts": 8}

- ``pattern`` is a Python regular expression matched against the whole name; ``names`` lists
  exact names instead (tensors that may be absent: a rule of names may match none).
- ``split``: ``"replicate"`` (the default: every rank takes the whole tensor), or ``{"dim": d}``
  (TP rank ``t`` of ``tp`` takes the ``t``-th of ``tp`` equal pieces along dim ``d``; ``"pad":
  true`` lets the last pieces be short, their rows zero; ``"groups": n``: the dim holds ``n``
  groups, heads, that are never cut, each rank taking ``n / tp`` of them, or each group on ``tp /
  n`` ranks when ``tp`` exceeds ``n``), with ``"parts"``: the dim holds consecutive fused parts (q, k,
  v), each split on its own (a part is its size, or ``{"size": s, "groups": n, "label": "k"}``)
  and a rank's parameter is its piece of each part, in order.
- A group named ``layer`` captures a layer index: every one of ``num_layers`` layers (or the
  rule's ``"layers"``) must then have each name the rule matches, else it is missing. A group
  named ``expert`` captures an expert index: each expert of ``num_experts`` lives on the ranks of
  its expert group (``--ep``, ``--expert-placement``, ``--redundant-experts``, ``--expert-map``)
  and its ``split`` cuts it inside the expert. ``num_layers`` / ``num_experts`` are numbers or
  config.json keys.
- ``"optional": {"default": v}``: tensors that may be absent and are then filled with ``v``
  (reported defaulted); ``"shape"`` gives the shape of absent ones and is checked for present ones.
- ``ignore``: patterns of names no rank loads, listed as ignored with the pattern.

Every pattern must match some checkpoint tensor and no tensor may match two rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from ..checkpoint.files import read_regular
from ..errors import CheckpointError, ConfigError
from ..jsondoc import parse, quoted, show

MAX_RULES_BYTES = 16 * 1024 * 1024
"""rules files larger than this are refused before reading"""

DOCUMENT_KEYS = ("rules", "ignore", "num_layers", "num_experts")
RULE_KEYS = ("pattern", "names", "split", "optional", "shape", "layers")
SPLIT_KEYS = ("dim", "pad", "groups", "parts")
PART_KEYS = ("size", "groups", "label")
CAPTURES = ("layer", "expert")
"""the named groups a pattern may have"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Part:
    """One fused part along a split's dim."""

    size: int
    """its extent along the dim"""
    groups: int | None
    """heads it holds that are never cut; None: cut into tp pieces"""
    label: str
    """its name in ``skip_units`` (``name[label]``) and messages"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Split:
    """How a rule's tensors are split over the TP ranks (or an expert's ranks)."""

    dim: int | None
    """the dim cut; None: replicated"""
    pad: bool = False
    """the last pieces may be short (their missing rows zero)"""
    groups: int | None = None
    """heads along the dim that are never cut; None: tp pieces"""
    parts: tuple[Part, ...] = ()
    """fused parts along the dim, each split on its own; empty: the dim is one part"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One entry of ``rules``."""

    where: str
    """how messages name it: ``rules[2] 'pattern'``"""
    pattern: re.Pattern | None
    """matched against whole names; None: ``names`` gives them"""
    names: tuple[str, ...]
    """exact names (with no pattern)"""
    split: Split
    """how its tensors split"""
    default: float | None
    """optional tensors: their value when absent; None: required"""
    shape: tuple[int, ...] | None
    """the shape of its tensors, checked when present, declared when absent"""
    layers: tuple[int, ...] | None
    """the layers that have its names (a pattern with a ``layer`` group); None: all"""

    def captures(self, group: str) -> bool:
        """Whether the pattern has the named group ``group`` (``layer`` or ``expert``)."""
        return self.pattern is not None and group in self.pattern.groupindex


@dataclass(frozen=True, kw_only=True, slots=True)
class Rules:
    """A checked rules document."""

    source: str | None
    """the file it was read from; None: given as a mapping"""
    rules: tuple[Rule, ...]
    """in document order"""
    ignore: tuple[tuple[str, re.Pattern], ...]
    """(how messages name it, pattern) of each ``ignore`` entry"""
    num_layers: int | str | None
    """layers (a number, or the config.json key holding it) for ``layer`` groups"""
    num_experts: int | str | None
    """experts (a number, or the config.json key holding it) for ``expert`` groups"""

    def error(self, message: str, cls: type = ConfigError) -> Exception:
        """An error about this document, naming its file."""
        return cls(message, file=self.source)


def read_rules(value: "str | Mapping | Rules") -> Rules:
    """Reads a rules file (a path) or checks a rules document already parsed (a mapping).

    Raises:
        ConfigError: the file is unreadable or no JSON, or an entry cannot be right; names the file
            and the entry (``rules[2] 'pattern'``), and what is wrong.
    """
    if isinstance(value, Rules):
        return value
    if isinstance(value, Mapping):
        return parse_rules(value, source=None)
    try:
        raw = read_regular(value, what="rules file", limit=MAX_RULES_BYTES)
    except CheckpointError as err:  # an option's file, not the checkpoint's
        raise ConfigError(err.message, file=value) from None
    try:
        doc = parse(raw, unique_keys=True)
    except ValueError as err:
        raise ConfigError(f"rules file is unreadable: {err}", file=value) from None
    return parse_rules(doc, source=value)


def _unknown(keys, allowed: tuple[str, ...], where: str, source: str | None) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise ConfigError(f"{where}: unknown key {quoted(extra[0])} (allowed: {', '.join(allowed)})", file=source)


def _count(value: object, what: str, source: str | None) -> int | str | None:
    if value is None or isinstance(value, str) and value or type(value) is int and value > 0:
        return value
    raise ConfigError(f"rules file {what} must be a positive integer or a config.json key, got {show(value)}",
                      file=source)


def _compile(pattern: object, where: str, source: str | None) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: a pattern must be a non-empty string, got {show(pattern)}", file=source)
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{where}: not a valid regular expression: {err}", file=source) from None
    odd = [g for g in compiled.groupindex if g not in CAPTURES]
    if odd:
        raise ConfigError(f"{where}: named group {quoted(odd[0])} means nothing here (the named groups a "
                          f"pattern may have: {', '.join(CAPTURES)})", file=source)
    return compiled


def parse_rules(doc: object, *, source: str | None) -> Rules:
    """Checks a parsed rules document (see the module docstring).

    Raises:
        ConfigError: naming the entry and what is wrong.
    """
    if not isinstance(doc, Mapping):
        raise ConfigError(f"a rules file must be a JSON object with a \"rules\" list, got {show(doc)}", file=source)
    _unknown(doc, DOCUMENT_KEYS, "rules file", source)
    entries = doc.get("rules")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"rules file \"rules\" must be a non-empty list of rules, got {show(entries)}", file=source)
    ignores = doc.get("ignore", [])
    if not isinstance(ignores, list):
        raise ConfigError(f"rules file \"ignore\" must be a list of patterns, got {show(ignores)}", file=source)
    rules = tuple(_rule(entry, i, source) for i, entry in enumerate(entries))
    ignore = tuple((f"ignore[{i}] {quoted(p) if isinstance(p, str) else show(p)}", _compile(p, f"ignore[{i}]", source))
                   for i, p in enumerate(ignores))
    for where, pattern in ignore:
        if pattern.groupindex:
            raise ConfigError(f"{where}: an ignore pattern captures nothing (no named groups)", file=source)
    out = Rules(source=source, rules=rules, ignore=ignore,
                num_layers=_count(doc.get("num_layers"), "num_layers", source),
                num_experts=_count(doc.get("num_experts"), "num_experts", source))
    for group, count in (("layer", out.num_layers), ("expert", out.num_experts)):
        rule = next((r for r in rules if r.captures(group)), None)
        if rule is not None and count is None:
            raise ConfigError(f"{rule.where}: its {group} group needs the number of {group}s: give \"num_{group}s\" "
                              f"(a number, or the config.json key that holds it)", file=source)
    return out


def _rule(entry: object, i: int, source: str | None) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be an object with a \"pattern\" or \"names\", got {show(entry)}", file=source)
    _unknown(entry, RULE_KEYS, where, source)
    if ("pattern" in entry) == ("names" in entry):
        raise ConfigError(f"{where} needs one of \"pattern\" (a regular expression) and \"names\" (a list of "
                          "names), not both", file=source)
    pattern, names = None, ()
    if "pattern" in entry:
        pattern = _compile(entry["pattern"], where, source)
        where = f"{where} {quoted(entry['pattern'])}"
    else:
        names = entry["names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
                or len(set(names)) != len(names):
            raise ConfigError(f"{where}: \"names\" must be a non-empty list of distinct names, got {show(names)}",
                              file=source)
        names = tuple(names)
        where = f"{where} {quoted(names[0])}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    default = None
    if "optional" in entry:
        optional = entry["optional"]
        value = optional.get("default") if isinstance(optional, Mapping) else None
        if not isinstance(optional, Mapping) or set(optional) != {"default"} or type(value) not in (int, float) \
                or not math.isfinite(value):
            raise ConfigError(f"{where}: \"optional\" must be {{\"default\": a finite number}}, got {show(optional)}",
                              file=source)
        if pattern is not None:
            raise ConfigError(f"{where}: optional tensors are named by \"names\" (a pattern cannot match an absent "
                              "tensor)", file=source)
        default = float(value)
    shape = entry.get("shape")
    if shape is not None and not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise ConfigError(f"{where}: \"shape\" must be a list of sizes, got {show(shape)}", file=source)
    layers = entry.get("layers")
    if layers is not None:
        if pattern is None or "layer" not in pattern.groupindex:
            raise ConfigError(f"{where}: \"layers\" needs a pattern with a layer group (?P<layer>...)", file=source)
        if not isinstance(layers, list) or not layers or not all(type(n) is int and n >= 0 for n in layers):
            raise ConfigError(f"{where}: \"layers\" must be a non-empty list of layer indices, got {show(layers)}",
                              file=source)
    split = _split(entry.get("split", "replicate"), where, source)
    if split.parts and pattern is not None and "expert" in pattern.groupindex:
        raise ConfigError(f"{where}: parts inside an expert are not supported; split each expert along one dim",
                          file=source)
    return Rule(where=where, pattern=pattern, names=names, split=split, default=default,
                shape=None if shape is None else tuple(shape), layers=None if layers is None else tuple(layers))


def _groups(value: object, where: str, source: str | None) -> int | None:
    if value is None or type(value) is int and value > 0:
        return value
    raise ConfigError(f"{where}: \"groups\" must be a positive integer, got {show(value)}", file=source)


def _split(value: object, where: str, source: str | None) -> Split:
    if value == "replicate":
        return Split(dim=None)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: \"split\" must be \"replicate\" or {{\"dim\": d, ...}}, got {show(value)}",
                          file=source)
    _unknown(value, SPLIT_KEYS, f"{where} split", source)
    dim = value.get("dim")
    if type(dim) is not int or dim < 0:
        raise ConfigError(f"{where}: split \"dim\" must be a dim of the tensor (0, 1, ...), got {show(dim)}",
                          file=source)
    pad = value.get("pad", False)
    if type(pad) is not bool:
        raise ConfigError(f"{where}: split \"pad\" must be true or false, got {show(pad)}", file=source)
    groups = _groups(value.get("groups"), where, source)
    parts_doc = value.get("parts", [])
    if not isinstance(parts_doc, list):
        raise ConfigError(f"{where}: split \"parts\" must be a list of sizes, got {show(parts_doc)}", file=source)
    if parts_doc and (pad or groups is not None):
        raise ConfigError(f"{where}: a split with \"parts\" gives \"groups\" per part and cannot pad", file=source)
    parts = []
    for j, part in enumerate(parts_doc):
        if type(part) is int:
            part = {"size": part}
        if not isinstance(part, Mapping):
            raise ConfigError(f"{where}: parts[{j}] must be a size or {{\"size\": s, ...}}, got {show(part)}",
                              file=source)
        _unknown(part, PART_KEYS, f"{where} parts[{j}]", source)
        size, label = part.get("size"), part.get("label", str(j))
        if type(size) is not int or size < 1:
            raise ConfigError(f"{where}: parts[{j}] size must be a positive integer, got {show(size)}", file=source)
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{where}: parts[{j}] label must be a non-empty string, got {show(label)}", file=source)
        parts.append(Part(size=size, groups=_groups(part.get("groups"), f"{where} parts[{j}]", source), label=label))
    if len({p.label for p in parts}) != len(parts):
        raise ConfigError(f"{where}: two parts have one label", file=source)
    return Split(dim=dim, pad=pad, groups=groups, parts=tuple(parts))
