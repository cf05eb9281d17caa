"""What a rank builds before it reads: the checkpoint's headers, the model of every pipeline
stage on the meta device, the plan, and the model's memory on its device."""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable

import torch
from torch import nn

from .casts import refuse_casts
from .checkpoint.directory import Checkpoint, open_checkpoint
from .comm import Collectives, pipe_ops_for
from .config import DTYPES, LoadConfig
from .errors import ConfigError, LayoutError, PlanError
from .expert_map import expert_plan
from .fileio import prefer_huge_pages
from .layout import Layout
from .models import BuildContext, ModelBuilder, check_config, default_ignores, expert_facts, reference_model
from .plan import Plan, plan as make_plan
from .quant import quant_config
from .quant.apply import check_stored, quantize_model
from .quant.config import QuantConfig
from .rules import bind_rules, rules_builder
from .spec import ParamSpec, collect_specs


def prepare(directory: str, config: LoadConfig, layout: Layout, build: ModelBuilder, *, rank: int,
            ops: Collectives, stage_ops: Collectives) -> tuple[Checkpoint, nn.Module, tuple[ParamSpec, ...], Plan]:
    """Reads the headers, builds the model of every pipeline stage on the meta device (specs
    of all stages make the unit table; ``rank``'s stage is the model returned), and plans.

    Raises:
        DistloadError: a bad checkpoint, or a model that does not fit it or the layout
            (a config-derived size error names config.json).
    """
    ckpt = open_checkpoint(directory, allow_pickle=config.allow_pickle_format)
    dtype = config.torch_dtype() or checkpoint_dtype(ckpt)
    config_json = os.path.join(ckpt.directory, "config.json")
    if config.rules is not None:  # rules say how each tensor splits: no model class
        if build is not reference_model:
            raise ConfigError("LoadConfig.rules and a model builder both say what to load; give one")
        bound = bind_rules(config, ckpt, layout, config_json)
        build, experts, model_ignores, quant = rules_builder(bound, config), bound.facts, bound.ignores, QuantConfig()
    else:
        try:
            quant = quant_config(ckpt.config, quantize=config.quantize, kv_cache_dtype=config.kv_cache_dtype)
            if build is reference_model:  # every field typed and the layer count bounded, before any layer is built
                check_config(ckpt.config, ckpt.tensors)
            experts = expert_facts(ckpt.config, ckpt.tensors)
            model_ignores = default_ignores(ckpt.config, ckpt.tensors)
        except ConfigError as err:
            err.file = err.file or config_json
            raise
    quantized: dict = {}  # checkpoint name -> the scheme and parameter reading it
    coords = layout.coords(rank)
    placements = expert_plan(experts, ep=layout.ep, placement=config.expert_placement,
                             redundant=config.redundant_experts, path=config.expert_map,
                             model_type=ckpt.config.get("model_type"))
    specs: list[ParamSpec] = []
    dtypes: list[torch.dtype] = []  # each spec's parameter dtype, for the cast rule
    mine: nn.Module | None = None
    for stage in range(layout.pp):
        peer = layout.rank(tp=coords.tp, dp=coords.dp, pp=stage)  # this rank's place in that stage
        ctx = BuildContext(config=ckpt.config, tp=layout.tp, tp_rank=coords.tp, ops=ops, dtype=dtype,
                           layout=layout, stage=stage, pipe=pipe_ops_for(layout, peer), rank=peer,
                           stage_ops=stage_ops, experts=placements, quant=quant, tensor_names=ckpt.tensors)
        try:
            model = build(ctx)
            quantized.update(quantize_model(model, quant, ckpt.tensors, dtype))
        except (PlanError, ConfigError) as err:  # sizes from config.json (layout options name themselves)
            err.file = err.file or config_json
            raise
        specs += [dataclasses.replace(spec, stage=stage) for spec in collect_specs(model)]
        added = specs[len(dtypes):]
        at = tensors_at(model, (spec.name for spec in added))
        dtypes += [at[spec.name].dtype for spec in added]
        if stage == coords.pp:
            mine = model
    assert mine is not None
    _refuse_expert_options(config, specs, ckpt.config)
    if config.rules is None:  # rules mode loads each tensor as stored
        check_stored(specs, ckpt.tensors, quantized)
    # every stage's casts, on every rank: a load and a dry run refuse the same ones, before any read
    refuse_casts(zip(specs, dtypes), ckpt.tensors, strict_dtype=config.strict_dtype)
    ignore = (*model_ignores, *config.ignore)
    return ckpt, mine, tuple(specs), make_plan(ckpt.tensors, specs, layout, ignore=ignore)


def _refuse_expert_options(config: LoadConfig, specs: list[ParamSpec], model_config) -> None:
    """Expert options for a model without experts are a mistake in the command, not a no-op."""
    if any(spec.experts is not None for spec in specs):
        return
    given = [f"{name}={value}" for name, value, default in
             (("ep", config.ep, 1), ("expert_parallel", config.expert_parallel, False),
              ("redundant_experts", config.redundant_experts, 0),
              ("expert_placement", config.expert_placement, "linear")) if value != default]
    if given:
        raise LayoutError(f"{given[0]} applies to mixture-of-experts models, and model_type "
                          f"{model_config.get('model_type')!r} has no experts; split it with tp, pp and dp")


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """Returns the model dtype a checkpoint asks for: config's ``dtype``/``torch_dtype``, else the
    floating-point dtype holding most of its bytes (FP8 aside)."""
    named = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    # by bytes, not tensor count: an FP8 checkpoint holds more float32 scales than bf16 tensors,
    # and its FP8 weights are no model dtype
    sizes: collections.Counter = collections.Counter()
    for t in ckpt.tensors.values():
        if t.dtype.is_floating_point and t.dtype.itemsize > 1:
            sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def materialize(model: nn.Module, device: torch.device, *, huge_pages: bool = False) -> nn.Module:
    """Allocates a meta-device model on ``device`` (uninitialized memory), keeping tied weights tied.

    Each parameter and buffer gets ``torch.empty`` storage; one object reached under several
    names (a tied LM head) becomes one tensor again. (``Module.to_empty`` would do the same
    through ``empty_like`` on meta tensors, whose first call imports sympy: seconds per rank.)
    ``huge_pages``: CPU tensors ask for transparent huge pages before their first touch.
    """
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta tensor kept alive, new one)
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, old in table.items():
                if old is None:
                    continue
                if id(old) not in made:
                    new = torch.empty(old.shape, dtype=old.dtype, device=device)
                    if huge_pages and new.device.type == "cpu":
                        prefer_huge_pages(new)
                    made[id(old)] = (old, nn.Parameter(new, requires_grad=old.requires_grad) if wrap else new)
                table[name] = made[id(old)][1]
    return model


def tensor_at(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` (a dotted path)."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def tensors_at(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``tensor_at`` for many names, from one walk of the model (a lookup per name cost 30 us:
    a sixth of a TP=8 rank's set-up CPU went to them); a tensor the walk does not list (a plain
    attribute of a custom module) is looked up on its own."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return {name: found[name] if name in found else tensor_at(model, name) for name in names}
