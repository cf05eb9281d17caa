"""What one rank expects to load: its keys with their roles, and its derived parameters; built
directly, or from an engine's own metadata in the shapes vLLM and SGLang use.

No rank can derive another rank's expectations (each builds only its own model), so every rank
declares its own, and the merge finds the owners of each key by comparing them.
"""

from __future__ import annotations

import dataclasses
import re
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import PlanError
from ..spec import Role
from .keys import OPTIONAL_BIT, Key, key_hash

StackedMapping = Sequence[tuple[str, str, object]]
"""vLLM's ``stacked_params_mapping``: ``(param_name, shard_name, shard_id)``, e.g.
``("qkv_proj", "q_proj", "q")``, ``("gate_up_proj", "up_proj", 1)``"""

ExpertMapping = Sequence[tuple[str, str, int, str]]
"""vLLM's ``FusedMoE.make_expert_params_mapping``: ``(param_name, weight_name, expert_id, shard_id)``,
``expert_id`` the physical expert and ``weight_name`` naming its logical one
(``("experts.w13_", "experts.5.up_proj.", 13, "w3")``), ``shard_id`` one of ``w1`` / ``w2`` / ``w3``"""

PieceOf = Callable[[str, str, object], "Key | None"]
"""``piece_of(param_name, checkpoint_name, shard_id)``: the key of the piece of that checkpoint
tensor this rank's parameter needs (``shard_id`` None for an unstacked parameter); None when it
needs no byte of it (a vocabulary piece made only of padding)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Expected:
    """One key a rank expects, with its role."""

    key: Key
    """the piece"""
    param: str
    """the parameter it fills (for messages)"""
    role: Role = Role.REQUIRED
    """required, or optional with ``default``"""
    default: float | None = None
    """the value an optional parameter keeps when the checkpoint lacks it"""
    copies: int = 1
    """how many times this rank writes it (two local slots hosting copies of one expert)"""


class Expectations:
    """One rank's expected keys and derived parameters.

    Each key is hashed as it is declared (while the engine builds its model), so the merge only
    sorts and sends the hashes.

    Example:
        >>> exp = Expectations()
        >>> exp.expect(Key.of("model.norm.weight"), param="model.norm.weight")
        >>> exp.expect(Key.of("model.layers.0.self_attn.k_scale"), param="model.layers.0.self_attn.attn.k_scale",
        ...            optional=1.0)
        >>> len(exp), [e.role.value for e in exp.entries()]
        (2, ['required', 'optional'])
    """

    def __init__(self) -> None:
        self._entries: list[Expected] = []
        self._position: dict[Key, int] = {}
        self._by_name: dict[str, list[int]] = {}
        self._first = array("q")
        self._second = array("i")
        self._copies = array("i")
        self._derived: dict[str, tuple[str, ...]] = {}
        self._placed: tuple = (None, 0, None)  # (index it was placed in, keys then, positions)

    def expect(self, key: Key, *, param: str = "", optional: float | None = None) -> None:
        """Declares that this rank loads ``key`` into ``param``: required, or optional with the
        default ``optional`` (KV-cache ``k_scale`` / ``v_scale``: 1.0). Declaring a key again with
        the same role means the rank writes it once more (a second local copy of an expert).

        Raises:
            PlanError: the key was declared before with another role or default.
        """
        role = Role.REQUIRED if optional is None else Role.OPTIONAL
        at = self._position.get(key)
        if at is not None:
            old = self._entries[at]
            if (old.role, old.default) != (role, optional):
                raise PlanError(f"{key.label} is declared {old.role.value} for {old.param or 'a parameter'} and "
                                f"{role.value} for {param or 'another'}", tensor=key.name)
            self._entries[at] = dataclasses.replace(old, copies=old.copies + 1)
            self._copies[at] += 1
            return
        first, second = key_hash(key)
        self._position[key] = len(self._entries)
        self._by_name.setdefault(key.name, []).append(len(self._entries))
        self._entries.append(Expected(key=key, param=param, role=role, default=optional))
        self._first.append(first)
        self._second.append(second | (OPTIONAL_BIT if optional is not None else 0))
        self._copies.append(1)

    def derive(self, param: str, sources: Iterable[str]) -> None:
        """Declares a parameter computed after loading from the checkpoint tensors ``sources``
        (a tied LM head, online FP8 scales): it has no key; a failed source names it in ``affects``."""
        self._derived[param] = tuple(sources)

    def entries(self) -> tuple[Expected, ...]:
        """Every expected key, in declaration order."""
        return tuple(self._entries)

    def entry(self, position: int) -> Expected:
        """The key declared ``position``-th."""
        return self._entries[position]

    def position(self, key: Key) -> int | None:
        """Where ``key`` was declared (None: not expected here)."""
        return self._position.get(key)

    def of_name(self, name: str) -> tuple[Expected, ...]:
        """The keys of checkpoint tensor ``name`` this rank expects."""
        return tuple(self._entries[i] for i in self._by_name.get(name, ()))

    def positions_of(self, name: str) -> list[int]:
        """Positions of the keys of checkpoint tensor ``name`` (see ``position``)."""
        return self._by_name.get(name, [])

    def names(self) -> frozenset[str]:
        """The checkpoint tensors this rank expects some piece of."""
        return frozenset(self._by_name)

    def name_positions(self, index: Mapping[str, int]) -> torch.Tensor:
        """The positions in ``index`` (checkpoint name -> position) of the tensors this rank expects
        a piece of (remembered for the last ``index`` while no key is added)."""
        held, count, positions = self._placed
        if held is not index or count != len(self._entries):
            positions = torch.tensor([index[n] for n in self._by_name if n in index], dtype=torch.int64)
            self._placed = (index, len(self._entries), positions)
        return positions

    def hashes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key, in declaration order: its 64-bit hash, its 32-bit second hash with the role in
        the low bit (``OPTIONAL_BIT``), and its local copies."""
        return tuple(torch.frombuffer(a, dtype=d).clone() if len(a) else torch.zeros(0, dtype=d)
                     for a, d in ((self._first, torch.int64), (self._second, torch.int32),
                                  (self._copies, torch.int32)))

    @property
    def derived(self) -> Mapping[str, tuple[str, ...]]:
        """Derived parameter -> the checkpoint tensors it is computed from."""
        return dict(self._derived)

    def __len__(self) -> int:
        return len(self._entries)


def from_engine(params: Iterable[str], *, piece_of: PieceOf, stacked: StackedMapping = (),
                experts: ExpertMapping = (), expert_maps: Mapping[str, Sequence[int] | None] | None = None,
                is_pp_missing: Callable[[str], bool] | None = None,
                checkpoint_name: Callable[[str], str] | None = None,
                optional: Mapping[str, float] | None = None,
                derived: Mapping[str, Sequence[str]] | None = None) -> Expectations:
    """Builds one rank's expectations from its parameters and the engine's own loading metadata,
    reading the mappings backwards (parameter -> checkpoint tensors) the way vLLM's and SGLang's
    ``load_weights`` read them forwards.

    For each parameter: a stacked mapping whose ``param_name`` it contains gives one checkpoint
    tensor per shard (``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``); an expert mapping gives
    one per *hosted* physical expert (``expert_maps[module]`` maps a physical id to its local slot,
    -1 when another rank hosts it; a module not named hosts all), named by its logical expert, so
    a redundant copy is a second owner of the same key; any other parameter is filled from
    ``checkpoint_name(param)`` (default: its own name). Parameters of derived roles have no key.

    Args:
        params: this rank's parameter names (``dict(model.named_parameters())``).
        piece_of: the piece of a checkpoint tensor a parameter needs (see ``PieceOf``).
        stacked: the stacked-parameter mapping.
        experts: the expert-parameter mapping.
        expert_maps: FusedMoE module path -> its ``expert_map`` (None: every expert is local).
        is_pp_missing: vLLM's ``is_pp_missing_parameter``: parameters of other pipeline stages.
        checkpoint_name: the checkpoint tensor of an unmapped parameter (vLLM stores
            ``self_attn.k_scale`` as ``self_attn.attn.k_scale``: give the reverse of that remap).
        optional: regex over parameter names -> default value (``r"\\.(k|v)_scale$": 1.0``).
        derived: derived parameter -> the checkpoint tensors it is computed from.

    Returns:
        The rank's ``Expectations``.
    """
    out = Expectations()
    optional = {re.compile(p): d for p, d in (optional or {}).items()}
    derived = dict(derived or {})
    maps = dict(expert_maps or {})
    for param in params:
        if is_pp_missing is not None and is_pp_missing(param):
            continue
        if param in derived:
            out.derive(param, derived[param])
            continue
        default = next((d for p, d in optional.items() if p.search(param)), None)
        for name, shard_id, copies in _sources(param, stacked, experts, maps, checkpoint_name):
            key = piece_of(param, name, shard_id)
            for _ in range(copies if key is not None else 0):
                out.expect(key, param=param, optional=default)
    return out


def _sources(param: str, stacked: StackedMapping, experts: ExpertMapping, maps: Mapping,
             checkpoint_name: Callable[[str], str] | None) -> list[tuple[str, object, int]]:
    """``(checkpoint name, shard_id, copies on this rank)`` of each tensor that fills ``param``."""
    out = [(param.replace(p, shard, 1), shard_id, 1) for p, shard, shard_id in stacked if p in param]
    if out:
        return out
    hosted: dict[tuple[str, object], int] = {}
    module = param.rpartition(".")[0]
    expert_map = maps.get(module)
    for p, weight, physical, shard_id in experts:
        if p not in param:
            continue
        if expert_map is not None and expert_map[physical] < 0:
            continue  # another rank hosts this physical expert
        name = param.replace(p, weight, 1)
        hosted[(name, shard_id)] = hosted.get((name, shard_id), 0) + 1
    if hosted or any(p in param for p, *_ in experts):
        return [(name, shard_id, n) for (name, shard_id), n in hosted.items()]
    return [(checkpoint_name(param) if checkpoint_name else param, None, 1)]
