"""GPTQ checkpoints written here from the format's definition, and their dequantized float32 twins.

The format (AutoGPTQ's ``QuantLinear.pack``, read by transformers / optimum and vLLM): a quantized
linear ``X`` with weight ``W [out, in]`` stores ``X.qweight`` int32 ``[in / pack, out]`` (word ``r``
of output ``o`` holds ``q[r * pack + k, o] << (bits * k)``, ``pack = 32 / bits``), ``X.qzeros``
int32 ``[groups, out / pack]`` (zero points packed the same way along the outputs; the original
``gptq`` format stores ``zero - 1``, ``gptq_v2`` the zero itself), ``X.scales`` float16
``[groups, out]`` and ``X.g_idx`` int32 ``[in]`` (the group of each input column); a bias stays.
``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])``, ``g = g_idx[i]``.

Quantizing is round-to-nearest per group (GPTQ's error feedback changes values, not the format):
``scale = (max - min) / maxq`` over the group with 0 in range, ``zero = round(-min / scale)``
(symmetric: the middle, ``2^(bits-1)``), ``q = clamp(round(w / scale) + zero, 0, maxq)``, the
scale rounded to float16 first. With ``desc_act`` the columns are ranked by their norm
(a stand-in for GPTQ's Hessian order), the groups cut along that order, and ``g_idx`` maps each
column to its group; ``qweight`` stays in column order. The linears quantized are every
``nn.Linear`` in the decoder layers but the MoE routers.
"""

from __future__ import annotations

import json
import os

import torch

from tests.hf_checkpoints import read_tensors, save_float_twin

SCHEMES = {  # bits, group size (None: one group per row), symmetric, desc_act, gptq_v2
    "gptq-int4-g32": dict(bits=4, group_size=32, sym=True),
    "gptq-int4-g64-desc": dict(bits=4, group_size=64, sym=False, desc_act=True),
    "gptq-int4-g32-desc-v2": dict(bits=4, group_size=32, sym=False, desc_act=True, v2=True),
    "gptq-int8-g64-v2": dict(bits=8, group_size=64, sym=False, v2=True),
    "gptq-int8-channel": dict(bits=8, group_size=None, sym=True),
}
"""the GPTQ schemes the tests write (keyword arguments of ``write_gptq_checkpoint``)"""

QUANTIZED = ("_proj.weight",)
"""name endings of the quantized weights (q/k/v/o, gate/up/down of dense MLPs and experts)"""


def is_quantized(name: str, t: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and name.endswith(QUANTIZED) and t.dim() == 2


def pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packs unsigned ``values`` (< 2^bits) along ``dim``, ``32 / bits`` a word, as int32 (two's complement)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    words = sum(v[..., k] << (bits * k) for k in range(per))
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def quantize(w: torch.Tensor, *, bits: int, group_size: int | None, sym: bool, desc_act: bool,
             v2: bool) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of ``w [out, in]`` (and, for the tests' oracles,
    the unsigned values ``q [in, out]`` and real zero points ``zero [groups, out]``)."""
    out, inp = w.shape
    maxq = 2 ** bits - 1
    gs = group_size or inp
    order = torch.argsort(w.float().norm(dim=0), descending=True) if desc_act else torch.arange(inp)
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[order] = (torch.arange(inp) // gs).to(torch.int32)
    groups = -(-inp // gs)
    scales = torch.empty(groups, out, dtype=torch.float16)
    zeros = torch.empty(groups, out, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g].float()
        lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-8).to(torch.float16)
        scales[g] = scale
        zeros[g] = torch.full_like(zeros[g], (maxq + 1) // 2) if sym else torch.round(-lo / scale.float()).long()
    s, z = scales.float()[g_idx.long()].t(), zeros[g_idx.long()].t()  # per column: [out, in]
    q = torch.clamp(torch.round(w.float() / s) + z, 0, maxq).long().t().contiguous()  # [in, out]
    assert v2 or bool((zeros >= 1).all()), "the gptq format cannot store a zero point of 0"
    return {"qweight": pack_words(q, bits, dim=0), "qzeros": pack_words(zeros - (0 if v2 else 1), bits, dim=1),
            "scales": scales, "g_idx": g_idx, "q": q, "zero": zeros}


def dequantize(t: dict[str, torch.Tensor], *, bits: int, v2: bool) -> torch.Tensor:
    """``W [out, in]`` from a layer's stored ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (float32),
    by the format's definition: unpack each word with shifts and masks, look up each column's group."""
    per, mask = 32 // bits, 2 ** bits - 1
    words = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(words >> (bits * k)) & mask for k in range(per)], dim=1).reshape(-1, words.shape[1])
    zwords = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    zero = torch.stack([(zwords >> (bits * k)) & mask for k in range(per)], dim=2).reshape(zwords.shape[0], -1)
    zero = zero + (0 if v2 else 1)
    g = t["g_idx"].long()
    return ((q - zero[g]).float() * t["scales"].float()[g]).t().contiguous()


def write_gptq_checkpoint(src: str, dst: str, *, bits: int, group_size: int | None, sym: bool = True,
                          desc_act: bool = False, v2: bool = False) -> str:
    """Copies the float32 checkpoint ``src`` to ``dst`` in the GPTQ format (see the module doc)."""
    tensors = read_tensors(src)
    out = {}
    for name, t in tensors.items():
        if not is_quantized(name, t):
            out[name] = t
            continue
        packed = quantize(t, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, v2=v2)
        prefix = name.removesuffix(".weight")
        out.update({f"{prefix}.{k}": packed[k] for k in ("qweight", "qzeros", "scales", "g_idx")})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq_v2" if v2 else "gptq", "damp_percent": 0.01, "true_sequential": True,
        "static_groups": False}
    return save_float_twin(src, dst, out, config)


def dequantized_gptq_checkpoint(src: str, dst: str) -> str:
    """A float32 checkpoint whose quantized weights are ``dequantize`` of the GPTQ checkpoint ``src``."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    q = config.pop("quantization_config")
    bits, v2 = q["bits"], q["checkpoint_format"] == "gptq_v2"
    tensors = read_tensors(src)
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    for name in tensors:
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            parts = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            out[f"{prefix}.weight"] = dequantize(parts, bits=bits, v2=v2)
    return save_float_twin(src, dst, out, config)
