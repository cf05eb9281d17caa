"""GPTQ checkpoints (``quant_method: gptq``): 4- or 8-bit weights packed into int32 words.

A quantized linear ``X`` stores (the AutoGPTQ layout vLLM and transformers read):

* ``X.qweight`` int32 ``[in / pack, out]``, ``pack = 32 / bits`` values a word along the inputs;
* ``X.qzeros`` int32 ``[groups, out / pack]``, zero points packed along the outputs;
* ``X.scales`` ``[groups, out]`` (float16 as written; read in the dtype stored);
* ``X.g_idx`` int32 ``[in]``: the group of each input column;
* ``X.bias`` unchanged, when the layer has one.

``groups = ceil(in / group_size)`` (``group_size: -1``: one group). Dequantized:
``scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``, where ``z`` is the stored zero point
plus one in the original format (``checkpoint_format: gptq``) and as stored in ``gptq_v2``.
Without ``desc_act`` the groups are consecutive (``g_idx[i] = i // group_size``, checked after
loading); with it ``g_idx`` is any assignment, so a row-parallel layer keeps ``scales`` and
``qzeros`` whole on every TP rank (as vLLM does) and only ``qweight`` and ``g_idx`` split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import CheckpointError, ConfigError, PlanError
from .base import Declared, Follow, WeightGeometry, beside, param_attr
from .intpack import IntScheme, column_groups, dequantize_groups, unpack

FORMATS = ("gptq", "gptq_v2")
"""``checkpoint_format`` values that load"""


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTQ(IntScheme):
    """One GPTQ scheme."""

    desc_act: bool = False
    """columns were quantized in activation order: ``g_idx`` assigns their groups"""
    zero_plus_one: bool = True
    """stored zero points are one less than the real ones (``checkpoint_format: gptq``)"""
    name: str = "gptq"
    """how reports name the scheme"""

    def declare(self, attr: str, g: WeightGeometry, model_dtype: torch.dtype) -> tuple[Declared, ...]:
        pack, gs = self.per_word, self.group_size
        for seg in g.segments:  # the format floors: out / pack and in / pack words, nothing partial
            out, inp = seg.source.shape[g.out_dim], seg.source.shape[g.in_dim]
            if out % pack or inp % pack:
                raise PlanError(f"GPTQ packs {pack} values a word: a {out} x {inp} matrix does not fill whole "
                                f"words (parameter {g.spec.name})", tensor=g.tensor_name(seg.source))
        groups = (lambda i: -(-i // gs)) if gs else (lambda i: 1)
        # consecutive groups split with their columns; activation order keeps them whole
        along = Follow(dim=0, per=gs, what="a quantization group") if gs and not self.desc_act else None
        scales = g.companion(beside("scales"), lambda o, i: (groups(i), o), out=Follow(dim=1), inp=along)
        zeros = g.companion(beside("qzeros"), lambda o, i: (groups(i), o // pack), inp=along,
                            out=Follow(dim=1, per=pack, what=f"a packed int32 word of {pack} zero points"))
        qweight = g.companion(beside("qweight"), lambda o, i: (i // pack, o), out=Follow(dim=1),
                              inp=Follow(dim=0, per=pack, what=f"a packed int32 word of {pack} values"))
        g_idx = g.companion(beside("g_idx"), lambda o, i: (i,), out=None, inp=Follow(dim=0))
        return (g.declared(attr, "qweight", *qweight, torch.int32),
                g.declared(attr, "qzeros", *zeros, torch.int32),
                g.declared(attr, "scales", *scales, torch.float16, stored_dtype=True),
                g.declared(attr, "g_idx", *g_idx, torch.int32))

    def _parts(self, layer, attr: str, g: WeightGeometry):
        """Per part: ``(q [..., cols, rows], zero [..., groups, rows], scale, group of each column)``."""
        q = unpack(getattr(layer, param_attr(attr, "qweight")), self.bits, dim=-2)
        zero = unpack(getattr(layer, param_attr(attr, "qzeros")), self.bits, dim=-1) + int(self.zero_plus_one)
        scale = getattr(layer, param_attr(attr, "scales"))
        g_idx = getattr(layer, param_attr(attr, "g_idx"))
        for i, seg in enumerate(g.segments):
            rows = slice(seg.start, seg.start + seg.rows)
            group = g_idx[..., i * g.cols:(i + 1) * g.cols].long() if self.desc_act else \
                column_groups(g.cols, self.group_size, q.device)
            yield q[..., rows], zero[..., rows], scale[..., rows], group

    def dequantize(self, layer, attr: str, g: WeightGeometry) -> torch.Tensor:
        parts = [dequantize_groups(q.transpose(-1, -2), z.transpose(-1, -2), s.transpose(-1, -2), group)
                 for q, z, s, group in self._parts(layer, attr, g)]
        return torch.cat(parts, dim=-2)

    def int4_operands(self, layer, attr: str, g: WeightGeometry) -> tuple | None:
        if self.desc_act:
            return None  # columns out of order: torch's kernel takes consecutive groups only
        parts = list(self._parts(layer, attr, g))
        q, zero, scale = (torch.cat([p[k] for p in parts], dim=-1).t() for k in range(3))
        return q, zero, scale, self.group_size or g.cols

    def post_load(self, layer, attr: str, g: WeightGeometry) -> None:
        """Every ``g_idx`` names a stored group; without ``desc_act`` it is the consecutive one.

        Raises:
            CheckpointError: naming the ``g_idx`` tensor.
        """
        g_idx = getattr(layer, param_attr(attr, "g_idx"))
        groups = getattr(layer, param_attr(attr, "scales")).shape[-2]
        parts = g_idx.reshape(-1, len(g.segments), g.cols).cpu()  # [slots or 1, parts, cols]
        for i, seg in enumerate(g.segments):
            name = beside("g_idx")(g.tensor_name(seg.source))
            for j, idx in enumerate(parts[:, i]):
                slot = f", local expert slot {j}" if g.experts is not None else ""
                if self.desc_act:  # scales are whole along the inputs: any stored group may be named
                    if int(idx.min()) < 0 or int(idx.max()) >= groups:
                        raise CheckpointError(f"g_idx names a group outside [0, {groups}) (parameter "
                                              f"{g.spec.name}{slot})", tensor=name)
                elif not torch.equal(idx.long(), column_groups(g.cols, self.group_size, idx.device) + int(idx[0])):
                    raise CheckpointError(f"g_idx is not in column order although desc_act is false (parameter "
                                          f"{g.spec.name}{slot})", tensor=name)


def parse(q: Mapping) -> tuple[GPTQ, tuple[str, ...]]:
    """The scheme and the module targets of a GPTQ ``quantization_config``.

    Returns:
        The scheme, and its targets: every quantizable linear, or the block-relative names of
        ``modules_in_block_to_quantize`` as regexes.

    Raises:
        ConfigError: bits other than 4 or 8, a bad group_size, an unknown checkpoint_format,
            per-module overrides (``dynamic``) or a quantized LM head.
    """
    bits, size = q.get("bits"), q.get("group_size", 128)
    if bits not in (4, 8):
        raise ConfigError(f"quant_method gptq with bits {bits!r} is not supported (supported: 4, 8)")
    if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
        raise ConfigError(f"quant_method gptq group_size must be a positive integer or -1, got {size!r}")
    fmt = q.get("checkpoint_format") or "gptq"
    if fmt not in FORMATS:
        raise ConfigError(f"quant_method gptq checkpoint_format {fmt!r} is not supported (supported: "
                          f"{', '.join(FORMATS)})")
    for key in ("dynamic", "lm_head"):
        if q.get(key):
            raise ConfigError(f"quant_method gptq with {key} set is not supported (per-module overrides and "
                              "a quantized LM head)")
    desc_act = bool(q.get("desc_act", False))
    label = f"gptq int{bits} " + (f"group {size}" if size > 0 else "channel") + \
        (", desc_act" if desc_act else "") + f" ({fmt})"
    method = GPTQ(bits=bits, group_size=size if size > 0 else None, desc_act=desc_act,
                  zero_plus_one=fmt == "gptq", name=label)
    blocks = q.get("modules_in_block_to_quantize")
    if not blocks:
        return method, ("Linear",)
    names = [n for group in blocks for n in (group if isinstance(group, (list, tuple)) else [group])]
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"quant_method gptq modules_in_block_to_quantize must list module names, got {blocks!r}")
    return method, tuple(f"re:(.*\\.)?{n.replace('.', chr(92) + '.')}$" for n in names)
