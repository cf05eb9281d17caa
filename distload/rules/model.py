"""The model of rules mode: no model class, one parameter per checkpoint tensor (this rank's piece of
it), named as the checkpoint names it, and one stacked parameter per expert template; its
``sharded_state_dict()`` is what a rules-mode load hands back.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..layout import Layout
from ..spec import ExpertSources, ParamSpec, Region, Role, Shard, Source, SpecProvider
from .bind import Bound, Expected, ExpertGroup, pieces
from .document import Rule


def _sources(rule: Rule, name: str, shape: tuple[int, ...], ranks: int) -> tuple[tuple[Source, ...], tuple[int, ...]]:
    """The sources of one tensor under its rule over ``ranks`` ranks, and the local parameter's shape."""
    split = rule.split
    if split.dim is None:
        return (Source(name=name, shape=shape),), shape
    d = split.dim
    if not split.parts:
        shard = Shard(dim=d, num_shards=pieces(split.groups, ranks, rule, name), pad=split.pad)
        local = (*shape[:d], shard.piece_len(shape[d]), *shape[d + 1:])
        return (Source(name=name, shape=shape, shard=shard),), local
    sources, start, offset = [], 0, 0
    for part in split.parts:
        shard = Shard(dim=d, num_shards=pieces(part.groups, ranks, rule, f"part {part.label!r}"))
        region = Region(tensor_shape=shape, dim=d, start=start, stop=start + part.size, label=part.label)
        sources.append(Source(name=name, shape=region.shape, shard=shard, offset=offset, region=region))
        start, offset = start + part.size, offset + part.size // shard.num_shards
    return tuple(sources), (*shape[:d], offset, *shape[d + 1:])


class Holder(nn.Module, SpecProvider):
    """A module of the name tree: the parameters (and their specs) of the names that end here."""

    def __init__(self) -> None:
        super().__init__()
        self._specs: dict[str, ParamSpec] = {}

    def param_specs(self, path: str) -> Iterable[ParamSpec]:
        return self._specs.values()


class RulesModel(Holder):
    """One rank's pieces of the checkpoint tensors the rules cover, as parameters named like them.

    ``state_dict()`` holds every expert template's slots stacked (``...experts.*.w1.weight``);
    ``sharded_state_dict()`` names each slot by its expert's checkpoint name instead.
    """

    def __init__(self, bound: Bound, *, layout: Layout, rank: int, experts, dtype: torch.dtype | None,
                 absent_dtype: torch.dtype, device: str = "meta") -> None:
        super().__init__()
        self._stacks: dict[str, tuple[str, tuple[int, ...]]] = {}  # stacked parameter -> (template, experts per slot)
        for e in bound.tensors:
            self._declare(e, layout, dtype, absent_dtype, device)
        group, _ = layout.expert_coords(rank)
        for g in bound.experts:
            self._declare_experts(g, experts.placement(g.layer), group, layout, dtype, absent_dtype, device)

    def forward(self, *args, **kwargs):
        raise ConfigError("a rules-mode model has no forward: it holds this rank's sharded state dict "
                          "(sharded_state_dict())")

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's tensors by checkpoint name: each its piece (fused parts: this rank's piece of each,
        concatenated in order), each hosted expert its slot of the stack (an expert held twice: the first)."""
        out = {}
        for name, tensor in self.state_dict().items():
            stack = self._stacks.get(name)
            if stack is None:
                out[name] = tensor
                continue
            template, held = stack
            for slot, expert in enumerate(held):
                out.setdefault(template.format(expert=expert), tensor[slot])
        return out

    def _holder(self, name: str) -> tuple[Holder, str]:
        *path, attr = name.split(".")
        node: Holder = self
        for i, part in enumerate(path):
            child = node._modules.get(part)
            if child is None:
                if not part or part in node._parameters or hasattr(node, part):
                    raise ConfigError(f"checkpoint tensor {name} cannot be named in a module tree (its part "
                                      f"{'.'.join(path[:i + 1])!r} is empty, a tensor or a torch attribute)")
                child = Holder()
                node.add_module(part, child)
            node = child
        if not attr or attr in node._modules or hasattr(node, attr):
            raise ConfigError(f"checkpoint tensor {name} cannot be named in a module tree (its last part "
                              f"{attr!r} is empty, a module or a torch attribute)")
        return node, attr

    def _declare(self, e: Expected, layout: Layout, dtype, absent_dtype, device) -> None:
        sources, local = _sources(e.rule, e.name, e.shape, layout.tp)
        optional = e.rule.default is not None
        spec = ParamSpec(name=e.name, shape=local, sources=sources, role=Role.OPTIONAL if optional else Role.REQUIRED,
                         default=e.rule.default)
        self._add(spec, _dtype(e.dtype, dtype, absent_dtype), device)

    def _declare_experts(self, g: ExpertGroup, placement, group: int, layout: Layout, dtype, absent_dtype,
                         device) -> None:
        (source,), local = _sources(g.rule, g.template, g.shape, layout.expert_tp)
        slots = placement.group_slots(group)
        spec = ParamSpec(name=g.path, shape=(len(slots), *local),
                         experts=ExpertSources(placement=placement, parts=(source,)))
        self._add(spec, _dtype(g.dtype, dtype, absent_dtype), device)
        self._stacks[g.path] = (g.template, tuple(placement.slots[s] for s in slots))

    def _add(self, spec: ParamSpec, dtype: torch.dtype, device) -> None:
        node, attr = self._holder(spec.name)
        node.register_parameter(attr, nn.Parameter(torch.empty(spec.shape, dtype=dtype, device=device),
                                                   requires_grad=False))
        node._specs[attr] = spec


def _dtype(stored: torch.dtype | None, asked: torch.dtype | None, absent: torch.dtype) -> torch.dtype:
    """A tensor keeps its stored dtype unless a model dtype was asked for (then floating tensors of two
    bytes or more are cast to it, as built-in models are); an absent one takes the model dtype."""
    if stored is None:
        return asked or absent
    if asked is not None and stored.is_floating_point and stored.itemsize > 1:
        return asked
    return stored
