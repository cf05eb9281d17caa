"""The ``--expert-map`` file: read safely, then checked against the model's experts and the layout."""

from __future__ import annotations

from . import jsondoc
from .checkpoint.files import read_regular
from .errors import CheckpointError, ConfigError, LayoutError
from .experts import ExpertFacts, ExpertPlacement, ExpertPlan, parse_expert_map

MAX_MAP_BYTES = 16 * 1024 * 1024
"""expert maps larger than this are refused before reading (one of 256 experts x 61 layers is ~200 KB)"""


def expert_plan(facts: ExpertFacts | None, *, ep: int, placement: str, redundant: int, path: str | None,
                model_type: object = None) -> ExpertPlan | None:
    """Every MoE layer's placement from the options and the ``--expert-map`` file (when ``path``
    is given); None for a model without experts.

    Raises:
        ConfigError, LayoutError: as ``read_expert_map``, or options that do not fit ``ep``.
    """
    layers = read_expert_map(path, facts, ep=ep, placement=placement, model_type=model_type) if path else {}
    if facts is None:
        return None
    return ExpertPlan.make(num_experts=facts.num_experts, ep=ep, kind=placement, redundant=redundant, layers=layers)


def read_expert_map(path: str, facts: ExpertFacts | None, *, ep: int, placement: str,
                    model_type: object = None) -> dict[int, ExpertPlacement]:
    """Reads an expert-map file into ``{layer: placement}`` (layer -1: the default).

    Args:
        path: the file (``{"layers": {"<layer>|default": {"<expert>": [slot, ...]}}}``).
        facts: the model's experts (``models.expert_facts``); None for a model without any.
        ep: expert-parallel groups per stage.
        placement: ``linear`` or ``round_robin``.
        model_type: config.json's, named when the model has no experts.

    Raises:
        ConfigError: the file is unreadable or no JSON document (not UTF-8, nested too deep,
            a number of too many digits, a key twice in one object).
        LayoutError: the model has no experts; a layer key, expert or slot out of range, or
            slots the layout cannot place (naming the layer). Every error names the file.
    """
    if facts is None:  # like --ep on a dense model: an option that does not apply
        raise LayoutError(f"--expert-map applies to mixture-of-experts models, and model_type {model_type!r} "
                          "has no experts", file=path)
    try:
        raw = read_regular(path, what="expert map", limit=MAX_MAP_BYTES)
    except CheckpointError as err:  # an option's file, not the checkpoint's
        raise ConfigError(err.message, file=path) from None
    try:
        value = jsondoc.parse(raw, unique_keys=True)
    except ValueError as err:
        raise ConfigError(f"expert map is unreadable: {err}", file=path) from None
    slots = parse_expert_map(value, num_experts=facts.num_experts, num_layers=facts.num_layers,
                             sparse_layers=facts.sparse_layers, path=path)
    placements = {}
    for layer, layer_slots in slots.items():  # placement rules (groups, replicas), naming the map's layer
        try:
            placements[layer] = ExpertPlacement.from_slots(num_experts=facts.num_experts, ep=ep, kind=placement,
                                                           slots=layer_slots)
        except LayoutError as err:
            raise LayoutError(f"expert map layer {'default' if layer < 0 else layer}: {err.message}",
                              file=path) from None
    return placements
