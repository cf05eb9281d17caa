"""compressed-tensors ``pack-quantized``: int4 / int8 weights packed into int32 words.

A quantized linear ``X`` stores (as compressed-tensors 0.20 writes it):

* ``X.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: ``32 / bits`` values a word along
  the inputs, each stored as ``value + 2^(bits-1)`` (so unsigned);
* ``X.weight_scale`` ``[out, in / group]`` (``group`` strategy) or ``[out, 1]`` (``channel``), in
  the model's float dtype;
* ``X.weight_zero_point`` int32 ``[ceil(out * bits / 32), groups]`` for asymmetric schemes, packed
  along the outputs, offset like the values;
* ``X.weight_shape`` int64 ``[2]``: ``[out, in]``, a unit of its own, checked after loading.

Dequantized: ``(value - zero) * scale`` of the value's group. Under TP a column-parallel shard
is whole packed words of zero points (a multiple of ``32 / bits`` rows when asymmetric), a
row-parallel shard whole groups and whole words (refused otherwise, naming the tensor and the
degrees that work). Activation ordering with a ``weight_g_idx`` (``actorder: group``, removed
from compressed-tensors) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import CheckpointError, ConfigError
from .base import Declared, Follow, WeightGeometry, beside, param_attr
from .intpack import IntScheme, column_groups, dequantize_groups, unpack

STRATEGIES = ("group", "channel")
"""weight strategies that load"""


@dataclass(frozen=True, kw_only=True, slots=True)
class PackedInt(IntScheme):
    """A compressed-tensors ``pack-quantized`` scheme (weight-only int4 or int8)."""

    symmetric: bool = True
    """False: ``weight_zero_point`` is stored"""
    name: str = "int4"
    """how reports name the scheme"""

    def declare(self, attr: str, g: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        pack, gs = self.per_word, self.group_size
        groups = (lambda i: i // gs) if gs else (lambda i: 1)
        along = Follow(dim=1, per=gs, what="a quantization group") if gs else None
        # the group rule first: it is the coarsest cut of the inputs, so its refusal names the degrees that work
        scale = g.companion(beside("weight_scale"), lambda o, i: (o, groups(i)), out=Follow(dim=0), inp=along)
        zero = None if self.symmetric else g.companion(
            beside("weight_zero_point"), lambda o, i: (math.ceil(o / pack), groups(i)), inp=along,
            out=Follow(dim=0, per=pack, what=f"a packed int32 word of {pack} zero points"))
        packed = g.companion(beside("weight_packed"), lambda o, i: (o, math.ceil(i / pack)), out=Follow(dim=0),
                             inp=Follow(dim=1, per=pack, what=f"a packed int32 word of {pack} values"))
        shape = g.companion(beside("weight_shape"), lambda o, i: (2,), out=None, inp=None)
        out = [g.declared(attr, "weight_packed", *packed, torch.int32),
               g.declared(attr, "weight_scale", *scale, model_dtype, stored_dtype=True)]
        if zero is not None:
            out.append(g.declared(attr, "weight_zero_point", *zero, torch.int32))
        out.append(g.declared(attr, "weight_shape", *shape, torch.int64))
        return tuple(out)

    def _values(self, layer, attr: str, g: WeightGeometry) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unsigned values ``[..., rows, cols]`` and zero points ``[..., rows, groups]`` (None: symmetric)."""
        q = unpack(getattr(layer, param_attr(attr, "weight_packed")), self.bits, dim=-1)[..., :g.cols]
        if self.symmetric:
            return q, None
        words = getattr(layer, param_attr(attr, "weight_zero_point"))
        zeros, at = [], 0
        for seg in g.segments:  # each part packs its own rows: its last word may be partial
            n = math.ceil(seg.rows / self.per_word)
            zeros.append(unpack(words[..., at:at + n, :], self.bits, dim=-2)[..., :seg.rows, :])
            at += n
        return q, torch.cat(zeros, dim=-2)

    def dequantize(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor:
        q, zero = self._values(layer, attr, g)
        if zero is None:  # symmetric: the stored offset is the zero point
            q, zero = q - (1 << (self.bits - 1)), None
        scale = getattr(layer, param_attr(attr, "weight_scale"))
        return dequantize_groups(q, zero, scale, column_groups(g.cols, self.group_size, q.device))

    def int4_operands(self, layer, attr: str, g: WeightGeometry) -> tuple | None:
        q, zero = self._values(layer, attr, g)
        scale = getattr(layer, param_attr(attr, "weight_scale"))
        if zero is None:
            zero = torch.full_like(scale, 1 << (self.bits - 1), dtype=torch.int32)
        return q, zero, scale, self.group_size or g.cols

    def post_load(self, layer, attr: str, g: WeightGeometry) -> None:
        """``weight_shape`` says the checkpoint matrix's ``[out, in]`` (the format's own check).

        Raises:
            CheckpointError: naming the ``weight_shape`` tensor that disagrees.
        """
        shapes = getattr(layer, param_attr(attr, "weight_shape"))
        shapes = shapes.reshape(*shapes.shape[:-1], len(g.segments), 2)  # [..., parts, 2]
        for i, seg in enumerate(g.segments):
            want = torch.tensor([seg.source.shape[g.out_dim], seg.source.shape[g.in_dim]], dtype=shapes.dtype)
            seen = shapes[..., i, :].reshape(-1, 2).cpu()
            bad = [j for j in range(seen.shape[0]) if not torch.equal(seen[j], want)]
            if bad:
                slot = f", local expert slot {bad[0]}" if g.experts is not None else ""
                raise CheckpointError(f"weight_shape says {seen[bad[0]].tolist()}, but the packed weight is a "
                                      f"{want.tolist()} matrix (parameter {g.spec.name}{slot})",
                                      tensor=beside("weight_shape")(g.tensor_name(seg.source)))


def parse_group(group: str, spec) -> PackedInt:
    """The scheme of one compressed-tensors config group in the ``pack-quantized`` format.

    Raises:
        ConfigError: bits other than 4 or 8, a float type, a strategy other than group / channel,
            activation quantization or activation ordering with a g_idx.
    """
    weights = spec.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"compressed-tensors group {group} quantizes no weights (activation-only schemes are "
                          "not supported)")
    bits, kind = weights.get("num_bits"), weights.get("type")
    if kind != "int" or bits not in (4, 8):
        raise ConfigError(f"compressed-tensors pack-quantized group {group} weights: {bits}-bit {kind} is not "
                          "supported (supported: 4-bit int, 8-bit int)")
    strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "channel")
    if strategy not in STRATEGIES:
        raise ConfigError(f"compressed-tensors pack-quantized weight strategy {strategy!r} (group {group}) is not "
                          f"supported (supported: {', '.join(STRATEGIES)})")
    size = weights.get("group_size")
    if strategy == "group" and not (isinstance(size, int) and size > 0):
        raise ConfigError(f"compressed-tensors group {group}: strategy group needs a positive group_size, got {size!r}")
    if weights.get("actorder") in ("group", "dynamic", True):
        raise ConfigError(f"compressed-tensors group {group}: actorder {weights.get('actorder')!r} (a weight_g_idx "
                          "per layer) is not supported (supported: none, weight)")
    if weights.get("dynamic"):
        raise ConfigError(f"compressed-tensors group {group}: dynamic weights are not supported")
    for key in ("input_activations", "output_activations"):
        if spec.get(key):
            raise ConfigError(f"compressed-tensors pack-quantized group {group}: {key} are not supported "
                              "(supported: weight-only schemes)")
    symmetric = weights.get("symmetric", True) is not False
    label = f"int{bits} {f'group {size}' if strategy == 'group' else 'channel'}" + \
        ("" if symmetric else " asymmetric") + ", weight-only"
    return PackedInt(bits=bits, group_size=size if strategy == "group" else None, symmetric=symmetric, name=label)
