"""PURE expert placement: which physical expert slots each expert-parallel group hosts, and
which logical expert each slot holds (redundant slots replicate hot experts)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from .errors import LayoutError
from .jsondoc import quoted, show

PLACEMENTS = ("linear", "round_robin")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertPlacement:
    """Physical slots of one MoE layer, spread over ``ep`` groups.

    ``slots[s]`` is the logical expert physical slot ``s`` holds. ``linear`` gives group
    g the contiguous slots ``[g * S / ep, (g + 1) * S / ep)``; ``round_robin`` the slots
    ``s`` with ``s % ep == g``.

    Example:
        >>> p = ExpertPlacement.make(num_experts=4, ep=2, redundant=2)
        >>> p.slots, p.group_slots(0), p.groups_of(0)
        ((0, 1, 2, 3, 0, 1), (0, 1, 2), (0, 1))
    """

    num_experts: int
    """logical experts"""
    ep: int
    """groups"""
    kind: str
    """``linear`` or ``round_robin``"""
    slots: tuple[int, ...]
    """physical slot -> logical expert"""
    _groups: tuple[tuple[int, ...], ...] = field(default=(), init=False, repr=False, compare=False)
    """expert -> groups hosting it (derived once: owners are asked for per unit)"""

    def __post_init__(self) -> None:
        groups: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(self.slots):
            if 0 <= expert < self.num_experts:
                groups[expert].append(self.group_of_slot(slot))
        object.__setattr__(self, "_groups", tuple(tuple(g) for g in groups))

    @classmethod
    def make(cls, *, num_experts: int, ep: int, kind: str = "linear", redundant: int = 0,
             hot: tuple[int, ...] | None = None) -> "ExpertPlacement":
        """Places ``num_experts`` experts plus ``redundant`` replicas of the ``hot`` ones (default:
        the first ``redundant`` experts) on ``ep`` groups.

        Raises:
            LayoutError: the slots do not divide over ep, or a replica would share a group
                with another copy of its expert; the message says what to change.
        """
        hot = tuple(range(redundant)) if hot is None else tuple(hot)
        if len(hot) != redundant or any(not 0 <= e < num_experts for e in hot):
            raise LayoutError(f"redundant experts {list(hot)} must be {redundant} experts in [0, {num_experts})")
        return cls.from_slots(num_experts=num_experts, ep=ep, kind=kind, slots=tuple(range(num_experts)) + hot)

    @classmethod
    def from_slots(cls, *, num_experts: int, ep: int, kind: str, slots: tuple[int, ...]) -> "ExpertPlacement":
        """Validates an explicit slot -> expert map (an expert-map file's layer entry)."""
        if kind not in PLACEMENTS:
            raise LayoutError(f"expert placement {kind!r} is unknown (known: {', '.join(PLACEMENTS)})")
        if len(slots) % ep:
            raise LayoutError(f"{len(slots)} expert slots ({num_experts} experts + {len(slots) - num_experts} "
                              f"redundant) do not divide over ep={ep}; choose a redundant count that makes "
                              f"experts + redundant a multiple of {ep}")
        if any(not 0 <= e < num_experts for e in slots) or set(slots) != set(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(slots))
            raise LayoutError(f"expert slots must cover experts 0..{num_experts - 1} and no others"
                              + (f"; missing {missing}" if missing else ""))
        placement = cls(num_experts=num_experts, ep=ep, kind=kind, slots=tuple(slots))
        for expert in range(num_experts):
            groups = [placement.group_of_slot(s) for s, e in enumerate(slots) if e == expert]
            if len(set(groups)) != len(groups):
                raise LayoutError(f"expert {expert} has two copies in expert group {groups[0]}: every replica "
                                  "must be on another group than its original (change the redundant experts, "
                                  "the placement or ep)")
        return placement

    @property
    def slots_per_group(self) -> int:
        return len(self.slots) // self.ep

    def group_of_slot(self, slot: int) -> int:
        per = self.slots_per_group
        return slot // per if self.kind == "linear" else slot % self.ep

    def group_slots(self, group: int) -> tuple[int, ...]:
        """Physical slots group ``group`` hosts, in the order of its local parameter."""
        per = self.slots_per_group
        if self.kind == "linear":
            return tuple(range(group * per, (group + 1) * per))
        return tuple(range(group, len(self.slots), self.ep))

    def groups_of(self, expert: int) -> tuple[int, ...]:
        """Groups hosting a copy of ``expert``, in slot order."""
        return self._groups[expert]


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertPlan:
    """Every MoE layer's placement, computed once from the options and the expert map.

    Example:
        >>> mapped = ExpertPlacement.from_slots(num_experts=4, ep=2, kind="linear", slots=(3, 2, 1, 0))
        >>> plan = ExpertPlan.make(num_experts=4, ep=2, redundant=2, layers={1: mapped})
        >>> plan.placement(0).slots, plan.placement(1).slots
        ((0, 1, 2, 3, 0, 1), (3, 2, 1, 0))
    """

    default: ExpertPlacement
    """the placement of each layer ``layers`` does not name"""
    layers: Mapping[int, ExpertPlacement] = field(default_factory=dict)
    """the layers an expert map places otherwise"""

    def placement(self, layer: int) -> ExpertPlacement:
        """The placement of decoder layer ``layer``."""
        return self.layers.get(layer, self.default)

    @classmethod
    def make(cls, *, num_experts: int, ep: int, kind: str = "linear", redundant: int = 0,
             layers: Mapping[int, ExpertPlacement] | None = None) -> "ExpertPlan":
        """The ``kind`` placement with ``redundant`` replicas, except where ``layers`` (an expert
        map's placements, ``-1``: its default) says otherwise.

        Raises:
            LayoutError: the redundant count or kind does not fit ``ep`` (checked even where the
                map's default replaces it: the option is wrong either way).
        """
        layers = dict(layers or {})
        rule = ExpertPlacement.make(num_experts=num_experts, ep=ep, kind=kind, redundant=redundant)
        return cls(default=layers.pop(-1, rule), layers=layers)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertFacts:
    """What an expert map is checked against: the model's experts and the layers that have them."""

    num_experts: int
    """logical experts of each sparse layer"""
    num_layers: int
    """decoder layers"""
    sparse_layers: frozenset[int]
    """layers with experts (the others have a dense MLP)"""


MAP_SHAPE = '{"layers": {"<layer>|default": {"<expert>": [slot, ...]}}}'
"""an expert-map document, as the messages describe it"""

_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")
"""a layer or expert key: a decimal number as ``str(int)`` writes it ("01" would alias "1")"""


def parse_expert_map(value: object, *, num_experts: int, num_layers: int,
                     sparse_layers: frozenset[int] | None = None, path: str | None = None) \
        -> dict[int, tuple[int, ...]]:
    """Turns an expert-map document into ``{layer: slots}`` (slot -> logical expert; layer -1: default).

    The document is ``{"layers": {"<layer>" or "default": {"<expert>": [slot, ...]}}}``:
    for each layer (``default`` for the others) the physical slots holding each
    logical expert. Every expert must have a slot, and the slots must be exactly
    ``0 .. S-1``, each used once.

    Args:
        value: the parsed document.
        num_experts: the model's experts.
        num_layers: the model's decoder layers.
        sparse_layers: the layers with experts (default: all); a key naming another is refused.
        path: the map file, named by the errors.

    Raises:
        LayoutError: naming the file, the layer key and what is wrong.
    """
    layers = value.get("layers") if isinstance(value, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise LayoutError(f"expert map: expected {MAP_SHAPE}, got {show(value)}", file=path)
    out: dict[int, tuple[int, ...]] = {}
    for key, entry in layers.items():
        if key != "default":
            if not (_INDEX.fullmatch(key) and int(key) < num_layers):
                raise LayoutError(f"expert map: layer key {quoted(key)} is not 'default' or a layer in "
                                  f"0..{num_layers - 1}", file=path)
            if sparse_layers is not None and int(key) not in sparse_layers:
                raise LayoutError(f"expert map: layer key {key!r} names a layer without experts (a dense MLP)",
                                  file=path)
        where = f"expert map layer {key}"
        if not isinstance(entry, dict):
            raise LayoutError(f"{where}: expected an object of expert -> slot list, got {show(entry)}", file=path)
        slot_of: dict[int, int] = {}
        for expert, slots in entry.items():
            if not (_INDEX.fullmatch(expert) and int(expert) < num_experts):
                raise LayoutError(f"{where}: expert {quoted(expert)} is not in 0..{num_experts - 1}", file=path)
            if not isinstance(slots, list) or not slots or not all(type(s) is int and s >= 0 for s in slots):
                raise LayoutError(f"{where}: expert {expert} needs a list of slot numbers (integers >= 0), "
                                  f"got {show(slots)}", file=path)
            for s in slots:
                if s in slot_of:
                    raise LayoutError(f"{where}: slot {s} is given to experts {slot_of[s]} and {expert}", file=path)
                slot_of[s] = int(expert)
        missing = sorted(set(range(num_experts)) - set(slot_of.values()))
        if missing:
            raise LayoutError(f"{where}: experts {show(missing)} have no slot", file=path)
        if sorted(slot_of) != list(range(len(slot_of))):
            raise LayoutError(f"{where}: slots must be 0..{len(slot_of) - 1}, each once; got {show(sorted(slot_of))}",
                              file=path)
        out[-1 if key == "default" else int(key)] = tuple(slot_of[s] for s in range(len(slot_of)))
    return out

