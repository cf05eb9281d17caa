"""Applies a QuantConfig to a model built on the meta device, and checks it against the headers."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from ..checkpoint.header import TensorInfo
from ..errors import PlanError
from ..spec import ParamSpec, PostLoad, Role
from .base import FP8, checkpoint_names
from .config import QuantConfig
from .layer import KVCacheScales, Quantizable, stored_float

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""what counts as FP8 in a checkpoint; the schemes read e4m3 only"""


def quantize_model(model: nn.Module, config: QuantConfig, tensors: Mapping[str, TensorInfo],
                   dtype: torch.dtype) -> frozenset[str]:
    """Hands each quantizable layer the scheme its checkpoint names select, and gives attention
    its KV-cache scales when the KV cache is FP8.

    Returns:
        The checkpoint names read into FP8 parameters.
    """
    fp8: set[str] = set()
    legacy = config.kv_cache_fp8 and any(n.endswith(".kv_scale") for n in tensors) and \
        not any(n.endswith(".k_scale") for n in tensors)
    for path, module in list(model.named_modules()):
        if isinstance(module, Quantizable) and module.quantizable and config.rules:
            parts = [_module_of(spec) for spec in module.unquantized_specs(path)
                     if spec.name[len(path) + 1:] in module.QUANTIZABLE]
            method = config.method_for(path, [p for group in parts for p in group]) if parts else None
            if method is not None:
                for d in module.quantize(method, path, dtype, tensors):
                    if d.dtype == FP8 and d.spec.role is not Role.DERIVED:
                        fp8.update(checkpoint_names(d.spec))
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
    return frozenset(fp8)


def _module_of(spec: ParamSpec) -> tuple[str, ...]:
    """Checkpoint module names of a weight's parts (expert 0's for expert-stacked weights)."""
    if spec.experts is not None:
        return tuple(spec.experts.name(p, 0).rpartition(".")[0] for p in spec.experts.parts)
    return tuple(s.name.rpartition(".")[0] for s in spec.sources)


def check_fp8_dtypes(specs: Iterable[ParamSpec], tensors: Mapping[str, TensorInfo], fp8: frozenset[str]) -> None:
    """Every tensor the model reads as FP8 is FP8 in the checkpoint, and no other one is.

    Raises:
        PlanError: naming the tensor, its file and what the config says about its layer.
    """
    for spec in specs:
        for name in checkpoint_names(spec):
            info = tensors.get(name)
            if info is None:
                continue
            stored = info.dtype in FP8_DTYPES
            if name in fp8 and stored and info.dtype != FP8:
                raise PlanError(f"the checkpoint stores this weight as {str(info.dtype).removeprefix('torch.')}; "
                                f"the FP8 schemes read float8_e4m3fn only (parameter {spec.name})",
                                file=info.file, tensor=name)
            if name in fp8 and not stored:
                raise PlanError(f"the quantization config makes this layer FP8, but the checkpoint stores its "
                                f"weight as {str(info.dtype).removeprefix('torch.')} (parameter {spec.name})",
                                file=info.file, tensor=name)
            if stored and name not in fp8:
                raise PlanError(f"the checkpoint stores this tensor as {str(info.dtype).removeprefix('torch.')}, "
                                f"but its layer is left unquantized (parameter {spec.name}) by quantization_config's "
                                "ignore list or by the model (routers, shared-expert gates, embeddings and the LM head "
                                "are never quantized)", file=info.file, tensor=name)


def process_after_loading(model: nn.Module) -> None:
    """Runs every module's post-load step once (call after the merge proved the load complete)."""
    for module in model.modules():
        if isinstance(module, PostLoad):
            module.process_after_loading()
