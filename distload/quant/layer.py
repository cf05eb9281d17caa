"""Mixins that let a layer hold quantized weights and FP8 KV-cache scales.

A layer declares its unquantized specs; ``quantize`` hands its weight matrices to a
method, which replaces each with the parameters the scheme stores and their specs. Forward
goes through the method. Nothing else of the layer changes: a bias stays a required unit of
its own.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import torch
from torch import nn

from ..checkpoint.header import TensorInfo
from ..spec import ParamSpec, PostLoad, Role, Source, SpecProvider
from .base import Declared, QuantMethod, WeightGeometry


class Quantizable(SpecProvider, PostLoad):
    """A layer whose weight matrices (``QUANTIZABLE`` attributes) may be stored quantized.

    Subclasses implement ``unquantized_specs(path)`` (what ``param_specs`` would be) and
    use ``linear`` or ``matrix`` in forward.
    """

    QUANTIZABLE: tuple[str, ...] = ("weight",)
    TARGET: str = "Linear"
    """the kind of layer a config's targets name (compressed-tensors' ``Linear``; ``PackedExperts``)"""
    MATRIX_DIMS: dict[str, tuple[int, int]] = {}
    """(output dim, input dim) of a quantizable weight (per expert) that is not ``(out, in)``"""
    quant: QuantMethod | None = None
    """the layer's scheme; None: unquantized"""
    quantizable: bool = True
    """False: never quantized, whatever the config's targets (a model's own default, like a router)"""

    def unquantized_specs(self, path: str) -> Iterable[ParamSpec]:
        raise NotImplementedError

    def quantize(self, method: QuantMethod, path: str, model_dtype: torch.dtype,
                 tensors: Mapping[str, TensorInfo] | None = None) -> tuple[Declared, ...]:
        """Replaces each quantizable weight by the parameters ``method`` declares (on the weight's
        device, normally meta). Returns what was declared.

        Args:
            tensors: the checkpoint's headers, for parameters declared ``stored_dtype``.
        """
        self.quant, self._quant_path, self._declared = method, path, {}
        self._unquantized = tuple(self.unquantized_specs(path))  # the weights it names may be replaced below
        out: list[Declared] = []
        for spec in self._unquantized:
            attr = spec.name[len(path) + 1:]
            if attr not in self.QUANTIZABLE:
                continue
            out_dim, in_dim = self.MATRIX_DIMS.get(attr, (0, 1))
            geometry = WeightGeometry.of(spec, out_dim=out_dim, in_dim=in_dim)
            declared = tuple(_stored_dtype(d, tensors or {}) for d in method.declare(attr, geometry, model_dtype))
            device = getattr(self, attr).device
            if attr not in {d.attr for d in declared}:  # a format that stores no tensor named like the weight
                self.register_parameter(attr, None)
            for d in declared:
                setattr(self, d.attr, nn.Parameter(torch.empty(d.spec.shape, dtype=d.dtype, device=device),
                                                   requires_grad=False))
            self._declared[attr] = (geometry, declared)
            out += declared
        return tuple(out)

    def param_specs(self, path: str):
        if self.quant is not None:
            assert path == self._quant_path, (path, self._quant_path)
        for spec in self._unquantized if self.quant is not None else self.unquantized_specs(path):
            attr = spec.name[len(path) + 1:]
            if self.quant is not None and attr in self._declared:
                yield from (d.spec for d in self._declared[attr][1])
            else:
                yield spec

    def matrix(self, attr: str, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``attr`` in ``dtype`` and the layer's own orientation (dequantized when stored
        quantized)."""
        if self.quant is None or attr not in self._declared:
            return getattr(self, attr)
        geometry = self._declared[attr][0]
        w = self.quant.dequantize(self, attr, geometry)
        return (w if geometry.out_dim == 0 else w.transpose(-1, -2)).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, attr: str = "weight") -> torch.Tensor:
        """``x W^T (+ b)``, through the scheme's own matmul when the weight is stored quantized."""
        if self.quant is None:
            return nn.functional.linear(x, getattr(self, attr), bias)
        return self.quant.apply(self, attr, self._declared[attr][0], x, bias)

    def computed_params(self) -> tuple[str, ...]:
        if self.quant is None:
            return ()
        return tuple(d.attr for _, declared in self._declared.values() for d in declared if d.spec.role is Role.DERIVED)

    def process_after_loading(self) -> None:
        if self.quant is not None:
            for attr, (geometry, _) in self._declared.items():
                self.quant.post_load(self, attr, geometry)


def _stored_dtype(d: Declared, tensors: Mapping[str, TensorInfo]) -> Declared:
    if not d.stored_dtype:
        return d
    spec = d.spec
    dtype = stored_float(tensors.get(spec.experts.name(spec.experts.parts[0], 0) if spec.experts is not None
                                     else spec.sources[0].name))
    return d if dtype is None else dataclasses.replace(d, dtype=dtype)


def stored_float(info: TensorInfo | None) -> torch.dtype | None:
    """The checkpoint dtype of a scale, when it is a float wider than 8 bits."""
    return info.dtype if info is not None and info.dtype.is_floating_point and info.dtype.itemsize > 1 else None


KV_SCALE_DEFAULT = 1.0
"""an FP8 KV cache without calibrated scales stores keys and values unscaled"""


class KVCacheScales(SpecProvider, PostLoad):
    """Attention's ``k_scale`` / ``v_scale``: declared only when the KV cache is FP8.

    Both are optional (default 1.0, reported *defaulted* when absent). Checkpoints in
    the older layout carry one ``kv_scale`` for both: ``k_scale`` is read from it and
    ``v_scale`` is derived from it (copied after loading).
    """

    kv_scales: str | None = None
    """None: no FP8 KV cache; ``split``: k_scale and v_scale; ``legacy``: one kv_scale"""

    def enable_kv_scales(self, layout: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        """Declares the scales: ``layout`` is ``split`` or ``legacy``; ``shape`` and ``dtype`` as
        the checkpoint stores them (float32 and ``[1]`` when it has none)."""
        self.kv_scales, self._kv_shape = layout, shape
        device = next(self.parameters()).device
        for attr in ("k_scale", "v_scale"):
            setattr(self, attr, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))

    def param_specs(self, path: str):
        if self.kv_scales is None:
            return
        shape = self._kv_shape
        if self.kv_scales == "split":
            for attr in ("k_scale", "v_scale"):
                yield ParamSpec(name=f"{path}.{attr}", shape=shape, role=Role.OPTIONAL, default=KV_SCALE_DEFAULT,
                                sources=(Source(name=f"{path}.{attr}", shape=shape),))
            return
        legacy = f"{path}.kv_scale"
        yield ParamSpec(name=f"{path}.k_scale", shape=shape, role=Role.OPTIONAL, default=KV_SCALE_DEFAULT,
                        sources=(Source(name=legacy, shape=shape),))
        yield ParamSpec(name=f"{path}.v_scale", shape=shape, role=Role.DERIVED, derived_from=(legacy,))

    def computed_params(self) -> tuple[str, ...]:
        return ("v_scale",) if self.kv_scales == "legacy" else ()

    def process_after_loading(self) -> None:
        if self.kv_scales == "legacy":
            with torch.no_grad():
                self.v_scale.copy_(self.k_scale)
