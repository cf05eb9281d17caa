"""PURE: a rules document matched against one checkpoint's headers and a layout: every tensor the
rules expect (present or not), the rule that splits it, and the experts they place.

A tensor a rule expects and the checkpoint lacks is still declared, so that tracking reports it
missing with its owners: the rules expect each name a pattern matches in every layer (and for
every expert) its ``layer`` (``expert``) group ranges over, and every name a rule of names lists.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import torch

from ..checkpoint.header import TensorInfo
from ..errors import ConfigError, LayoutError, PlanError
from ..experts import ExpertFacts
from ..layout import Layout
from ..models.fields import MAX_EXPERTS, Fields
from .document import Rule, Rules

MARK = "\0"
"""stands for a captured index in a name's template"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Expected:
    """One checkpoint tensor the rules expect."""

    name: str
    """its checkpoint name"""
    shape: tuple[int, ...]
    """its full shape (the checkpoint's; for an absent one, its siblings' or the rule's)"""
    dtype: torch.dtype | None
    """its stored dtype; None: absent"""
    rule: Rule
    """the rule that splits it"""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertGroup:
    """The experts of one name template (one layer's ``w1`` of every expert): one stacked parameter."""

    path: str
    """the stacked parameter's name (the template with ``*`` for the expert index)"""
    template: str
    """the checkpoint name with an ``{expert}`` field"""
    layer: int
    """its layer (the expert map's key); -1: the rule captures none"""
    shape: tuple[int, ...]
    """one expert's full shape"""
    dtype: torch.dtype | None
    """the stored dtype of the experts present; None: none is"""
    rule: Rule
    """the rule that splits each expert"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Bound:
    """A rules document bound to a checkpoint and a layout."""

    rules: Rules
    """the document"""
    tensors: tuple[Expected, ...]
    """the tensors outside experts, in name order"""
    experts: tuple[ExpertGroup, ...]
    """the expert groups, in name order"""
    facts: ExpertFacts | None
    """the experts to place (None: no rule captures an expert)"""

    @property
    def ignores(self) -> tuple[str, ...]:
        """The ignore patterns (searched in names, as ``--ignore``)."""
        return tuple(p.pattern for _, p in self.rules.ignore)


def pieces(groups: int | None, ranks: int, rule: Rule, what: str) -> int:
    """How many distinct pieces ``ranks`` ranks cut a dim of ``groups`` unbreakable groups into.

    Raises:
        PlanError: the groups neither divide over the ranks nor the ranks over the groups.
    """
    if groups is None or groups % ranks == 0:
        return ranks
    if ranks % groups == 0:
        return groups
    raise PlanError(f"{rule.where}: {what} holds {groups} groups, which do not fit {ranks} ranks (one must "
                    "divide the other)")


def check_split(rule: Rule, name: str, shape: tuple[int, ...], ranks: int, axis: str) -> None:
    """The rule's split fits a tensor of ``shape`` over ``ranks`` ranks (``axis`` names them).

    Raises:
        PlanError: naming the rule, the tensor and what does not divide.
    """
    split = rule.split
    if split.dim is None:
        return
    if split.dim >= len(shape):
        raise PlanError(f"{rule.where}: split dim {split.dim}, but {name} has shape {list(shape)}", tensor=name)
    size = shape[split.dim]
    parts = split.parts or ()
    if parts and sum(p.size for p in parts) != size:
        raise PlanError(f"{rule.where}: parts {[p.size for p in parts]} add up to {sum(p.size for p in parts)}, but "
                        f"dim {split.dim} of {name} is {size}", tensor=name)
    for label, extent, groups in ([(p.label, p.size, p.groups) for p in parts] or [("", size, split.groups)]):
        what = f"part {label!r} ({extent})" if parts else f"dim {split.dim} of {name} ({size})"
        n = pieces(groups, ranks, rule, what)
        if groups is not None and extent % groups:
            raise PlanError(f"{rule.where}: {what} does not hold {groups} equal groups", tensor=name)
        if extent % n and not split.pad:
            raise PlanError(f"{rule.where}: {what} does not split into {n} pieces for {axis}={ranks} "
                            "(a vocabulary may pad: \"pad\": true)", tensor=name)


def _count(value: int | str, key: str, config: Mapping, config_file: str | None, cap: int | None = None) -> int:
    if isinstance(value, int):
        return value
    try:
        return Fields(config, needed_by=f"the rules file's {key}").integer(value, **({"cap": cap} if cap else {}))
    except ConfigError as err:
        err.file = config_file
        raise


def _template(rule: Rule, name: str) -> tuple[str, dict[str, int]]:
    """The name with each captured index replaced by MARK + group + MARK, and the indices."""
    found = rule.pattern.fullmatch(name)
    spans = sorted((found.span(g), g) for g in ("layer", "expert") if rule.captures(g) and found.group(g))
    out, at, values = [], 0, {}
    for (start, stop), group in spans:
        text = found.group(group)
        if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
            raise ConfigError(f"{rule.where}: {name} captures {group} {text!r}, which is no index (a decimal number)")
        out += [name[at:start], f"{MARK}{group}{MARK}"]
        at, values[group] = stop, int(text)
    return "".join(out) + name[at:], values


def _render(template: str, values: Mapping[str, int]) -> str:
    for group, value in values.items():
        template = template.replace(f"{MARK}{group}{MARK}", str(value))
    return template


def bind(rules: Rules, config: Mapping, tensors: Mapping[str, TensorInfo], layout: Layout, *,
         config_file: str | None = None) -> Bound:
    """Matches every checkpoint tensor to at most one rule, checks every rule against the tensors it
    matches, and lists the tensors the rules expect.

    Raises:
        ConfigError: a pattern that matches nothing, a tensor two rules match, a captured index out of
            range (each naming the rule, and the file of the rules).
        PlanError: a split that does not divide over the layout (naming the rule and the tensor).
        LayoutError: pipeline stages (rules name no layer order).
    """
    if layout.pp > 1:
        raise LayoutError(f"rules mode loads per-rank state dicts split over tp, dp and ep; pipeline stages "
                          f"need a model's layer order (pp={layout.pp}): use --pp 1", file=rules.source)
    by_rule: dict[int, list[str]] = {i: [] for i in range(len(rules.rules))}
    ignored: dict[str, int] = {where: 0 for where, _ in rules.ignore}
    listed: dict[str, int] = {}
    for i, r in enumerate(rules.rules):
        for n in r.names:
            if n in listed:
                raise rules.error(f"checkpoint tensor {n} is listed by {rules.rules[listed[n]].where} and {r.where}: "
                                  f"one rule per tensor")
            listed[n] = i
    for name in sorted(tensors):
        hits = [r.where for i, r in enumerate(rules.rules)
                if (r.pattern.fullmatch(name) if r.pattern is not None else listed.get(name) == i)]
        hits += [where for where, p in rules.ignore if p.search(name)]
        if len(hits) > 1:
            raise rules.error(f"checkpoint tensor {name} matches {hits[0]} and {hits[1]}: one rule per tensor")
        if hits and hits[0] in ignored:
            ignored[hits[0]] += 1
        elif hits:
            by_rule[next(i for i, r in enumerate(rules.rules) if r.where == hits[0])].append(name)
    for where, count in [*((r.where, len(by_rule[i])) for i, r in enumerate(rules.rules) if r.pattern is not None),
                         *ignored.items()]:
        if not count:
            raise rules.error(f"{where} matches no checkpoint tensor")
    layers = _count(rules.num_layers, "num_layers", config, config_file) if rules.num_layers is not None else None
    experts = (_count(rules.num_experts, "num_experts", config, config_file, MAX_EXPERTS)
               if rules.num_experts is not None else None)
    plain: list[Expected] = []
    groups: list[ExpertGroup] = []
    for i, rule in enumerate(rules.rules):
        if rule.pattern is None:
            plain += _listed(rules, rule, tensors)
            continue
        _expand(rules, rule, by_rule[i], tensors, layers, experts, plain, groups, layout)
    for e in plain:
        check_split(e.rule, e.name, e.shape, layout.tp, "tp")
    sparse = frozenset(g.layer for g in groups)
    facts = None if not groups else ExpertFacts(num_experts=experts, num_layers=max(layers or 1, max(sparse) + 1),
                                                sparse_layers=sparse)
    return Bound(rules=rules, tensors=tuple(sorted(plain, key=lambda e: e.name)),
                 experts=tuple(sorted(groups, key=lambda g: g.path)), facts=facts)


def _listed(rules: Rules, rule: Rule, tensors: Mapping[str, TensorInfo]) -> list[Expected]:
    out = []
    for name in rule.names:
        info = tensors.get(name)
        shape = _shape(rules, rule, name, info, None)
        out.append(Expected(name=name, shape=shape, dtype=info.dtype if info else None, rule=rule))
    return out


def _shape(rules: Rules, rule: Rule, name: str, info: TensorInfo | None,
           sibling: tuple[int, ...] | None) -> tuple[int, ...]:
    """A present tensor's shape (the rule's, when it gives one, must agree); an absent one's from a
    sibling or the rule."""
    if info is not None:
        if rule.shape is not None and info.shape != rule.shape:
            raise PlanError(f"{rule.where}: checkpoint shape {list(info.shape)} differs from the rule's "
                            f"{list(rule.shape)}", file=info.file, tensor=name)
        return info.shape
    shape = rule.shape if rule.shape is not None else sibling
    if shape is None:
        raise rules.error(f"{rule.where}: {name} is not in the checkpoint; give the rule a \"shape\" so that it "
                          "can be declared (and reported)")
    return shape


def _expand(rules: Rules, rule: Rule, names: list[str], tensors: Mapping[str, TensorInfo], layers: int | None,
            experts: int | None, plain: list[Expected], groups: list[ExpertGroup], layout: Layout) -> None:
    """Every name the rule expects: each template it matched, in every layer and for every expert."""
    wanted = {"layer": tuple(rule.layers if rule.layers is not None else range(layers or 0)),
              "expert": tuple(range(experts or 0))}
    seen: dict[str, list[str]] = {}
    for name in names:
        template, values = _template(rule, name)
        for group, value in values.items():
            if value not in wanted[group]:
                count = f"num_{group}s is {len(wanted[group])}" if group == "expert" or rule.layers is None else \
                    f"its layers are {list(wanted['layer'])}"
                raise rules.error(f"{rule.where}: {name} has {group} {value}, but {count} (narrow the pattern, or "
                                  "ignore it)")
        seen.setdefault(template, []).append(name)
    for template, present in seen.items():
        first = tensors[present[0]]
        axes = [g for g in ("layer", "expert") if f"{MARK}{g}{MARK}" in template]  # an optional group may be unused
        grid = [{}] if not axes else [dict(zip(axes, combo)) for combo in itertools.product(*(wanted[a] for a in axes))]
        expected = [(_render(template, values), values) for values in grid]
        expected = [(n, v) for n, v in expected if rule.pattern.fullmatch(n)]
        if "expert" not in axes:
            plain.extend(Expected(name=n, shape=_shape(rules, rule, n, tensors.get(n), first.shape),
                                  dtype=tensors[n].dtype if n in tensors else None, rule=rule) for n, _ in expected)
            continue
        by_layer: dict[int, list[str]] = {}
        for n, values in expected:
            by_layer.setdefault(values.get("layer", -1), []).append(n)
        mark = f"{MARK}expert{MARK}"
        for layer in by_layer:
            name = _render(template, {} if layer < 0 else {"layer": layer})
            shape = _shape(rules, rule, name, None, first.shape)
            check_split(rule, present[0], shape, layout.expert_tp, "expert tp")
            fmt = name.replace("{", "{{").replace("}", "}}").replace(mark, "{expert}")
            groups.append(ExpertGroup(path=name.replace(mark, "*"), template=fmt, layer=layer, shape=shape,
                                      dtype=first.dtype, rule=rule))
