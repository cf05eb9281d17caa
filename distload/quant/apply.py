"""Applies a QuantConfig to a model built on the meta device, and checks it against the headers."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from ..checkpoint.header import TensorInfo
from ..errors import PlanError
from ..spec import ParamSpec, PostLoad, Role
from .base import Declared, QuantMethod, checkpoint_names
from .config import FORMATS, QuantConfig
from .layer import KVCacheScales, Quantizable, stored_float

Quantized = Mapping[str, tuple[QuantMethod, Declared]]
"""checkpoint name -> the method and quantized parameter that read it"""


def quantize_model(model: nn.Module, config: QuantConfig, tensors: Mapping[str, TensorInfo],
                   dtype: torch.dtype) -> Quantized:
    """Hands each quantizable layer the scheme its checkpoint names select, and gives attention
    its KV-cache scales when the KV cache is FP8.

    Returns:
        Every checkpoint name read into a parameter a scheme declared, with its scheme.
    """
    quantized: dict[str, tuple[QuantMethod, Declared]] = {}
    legacy = config.kv_cache_fp8 and any(n.endswith(".kv_scale") for n in tensors) and \
        not any(n.endswith(".k_scale") for n in tensors)
    for path, module in list(model.named_modules()):
        if isinstance(module, Quantizable) and module.quantizable and config.rules:
            parts = [_module_of(spec) for spec in module.unquantized_specs(path)
                     if spec.name[len(path) + 1:] in module.QUANTIZABLE]
            method = config.method_for(path, [p for group in parts for p in group], module.TARGET) if parts else None
            if method is not None:
                for d in module.quantize(method, path, dtype, tensors):
                    if d.spec.role is not Role.DERIVED:
                        quantized.update((name, (method, d)) for name in checkpoint_names(d.spec))
        if isinstance(module, KVCacheScales) and config.kv_cache_fp8:
            names = [f"{path}.kv_scale"] if legacy else [f"{path}.k_scale", f"{path}.v_scale"]
            found = [tensors[n] for n in names if n in tensors]
            for info in found:
                if math.prod(info.shape) != 1:
                    raise PlanError(f"a KV-cache scale must hold one value, this one has shape {list(info.shape)}",
                                    file=info.file, tensor=info.name)
            # one value, declared [1] (a 0-d scalar in the checkpoint fills it as well)
            kv_dtype = stored_float(found[0] if found else None) or torch.float32
            module.enable_kv_scales("legacy" if legacy else "split", (1,), kv_dtype)
    return quantized


def _module_of(spec: ParamSpec) -> tuple[str, ...]:
    """Checkpoint module names of a weight's parts (expert 0's for expert-stacked weights)."""
    if spec.experts is not None:
        return tuple(spec.experts.name(p, 0).rpartition(".")[0] for p in spec.experts.parts)
    return tuple(s.name.rpartition(".")[0] for s in spec.sources)


def check_stored(specs: Iterable[ParamSpec], tensors: Mapping[str, TensorInfo], quantized: Quantized) -> None:
    """Every tensor a scheme reads is what its format stores, and no tensor an unquantized
    parameter reads is stored in a dtype only quantized weights are stored in (FP8).

    Raises:
        PlanError: naming the tensor, its file and what the config says about its layer.
    """
    for spec in specs:
        for name in checkpoint_names(spec):
            info = tensors.get(name)
            if info is None:
                continue
            hit = quantized.get(name)
            if hit is not None:
                why = hit[0].refusal(hit[1], info)
            else:
                why = next((w for w in (f.unquantized_refusal(info, spec.name) for f in FORMATS) if w), None)
            if why:
                raise PlanError(why, file=info.file, tensor=name)


def process_after_loading(model: nn.Module) -> None:
    """Runs every module's post-load step once (call after the merge proved the load complete)."""
    for module in model.modules():
        if isinstance(module, PostLoad):
            module.process_after_loading()
