"""Which checkpoint slices each rank's int-quantized parameters hold, by hand (not taken from distload).

A rank's quantized weight is a list of ``Piece``s of checkpoint matrices (rows = output features,
columns = input features, as ``tests.quant_slices`` cuts them): the heads, KV pieces and MLP rows of
a column-parallel layer, the columns of a row-parallel one, each hosted expert's shard. Each format
stores a matrix as several tensors whose dims follow the matrix's rows or columns at some number
of them per entry (``FORMATS``); a piece of the matrix is the matching slice of each tensor, and the
pieces of a fused parameter are concatenated along the tensor's row dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from tests.hf_checkpoints import HFSpec
from tests.layouts import L, coords, hosted, stage_of_layer
from tests.quant_slices import Piece, part


def facts(spec: HFSpec) -> SimpleNamespace:
    """The sizes a layout's slices depend on, from the spec the checkpoint was written from."""
    experts = spec.extra.get("num_experts", 0)
    dense = spec.extra.get("mlp_only_layers", []) if experts else range(spec.num_hidden_layers)
    return SimpleNamespace(num_layers=spec.num_hidden_layers, num_experts=experts, dense=frozenset(dense),
                           rows_q=spec.num_attention_heads * spec.head_dim,
                           rows_kv=spec.num_key_value_heads * spec.head_dim, kv_heads=spec.num_key_value_heads,
                           intermediate=spec.intermediate_size, expert_width=spec.extra.get("moe_intermediate_size"))


def matrices(f: SimpleNamespace, lay: L, rank: int) -> dict[str, list]:
    """Every quantized parameter of ``rank`` (named like its weight attribute) -> its pieces, or for
    stacked experts one list of pieces per local slot."""
    tp = lay.tp
    tp_i, _, pp_i = coords(lay, rank)
    kv = min(tp, f.kv_heads)
    kv_i = tp_i // (tp // kv)
    rows_q, rows_kv = f.rows_q, f.rows_kv
    out: dict[str, list] = {}
    for layer in range(f.num_layers):
        if stage_of_layer(f, lay, layer) != pp_i:
            continue
        a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        out[a + "qkv_proj"] = [Piece(a + "q_proj.weight", rows=part(tp_i, tp, rows_q)),
                               Piece(a + "k_proj.weight", rows=part(kv_i, kv, rows_kv)),
                               Piece(a + "v_proj.weight", rows=part(kv_i, kv, rows_kv))]
        out[a + "o_proj"] = [Piece(a + "o_proj.weight", cols=part(tp_i, tp, rows_q))]
        if layer in f.dense:
            out[m + "gate_up_proj"] = [Piece(m + "gate_proj.weight", rows=part(tp_i, tp, f.intermediate)),
                                       Piece(m + "up_proj.weight", rows=part(tp_i, tp, f.intermediate))]
            out[m + "down_proj"] = [Piece(m + "down_proj.weight", cols=part(tp_i, tp, f.intermediate))]
            continue
        experts, shard, etp = hosted(f, lay, rank)
        mine = part(shard, etp, f.expert_width)
        e = m + "experts.{}."
        out[m + "experts.w13"] = [[Piece(e.format(x) + "gate_proj.weight", rows=mine),
                                   Piece(e.format(x) + "up_proj.weight", rows=mine)] for x in experts]
        out[m + "experts.w2"] = [[Piece(e.format(x) + "down_proj.weight", cols=mine)] for x in experts]
    return out


@dataclass(frozen=True)
class Axis:
    """A tensor dim that follows the matrix's rows or columns, ``per`` of them an entry."""

    dim: int
    per: int = 1


def formats(q: dict) -> dict[str, tuple[Axis | None, Axis | None]]:
    """Each tensor a format stores per matrix -> (the dim following rows, the dim following columns);
    None: the tensor is whole along them. From the format definitions in the module docs of
    ``tests.ct_int_checkpoints`` and ``tests.gptq_checkpoints``."""
    if q["quant_method"] == "gptq":
        pack, gs = 32 // q["bits"], q["group_size"]
        groups = Axis(0, gs) if gs > 0 and not q["desc_act"] else None  # activation order: scales whole
        return {"qweight": (Axis(1), Axis(0, pack)), "qzeros": (Axis(1, pack), groups),
                "scales": (Axis(1), groups), "g_idx": (None, Axis(0))}
    (group,) = q["config_groups"].values()
    w = group["weights"]
    pack, gs = 32 // w["num_bits"], w.get("group_size")
    groups = Axis(1, gs) if w["strategy"] == "group" else None
    out = {"weight_packed": (Axis(0), Axis(1, pack)), "weight_scale": (Axis(0), groups), "weight_shape": (None, None)}
    if not w["symmetric"]:
        out["weight_zero_point"] = (Axis(0, pack), groups)
    return out


def _cut(t: torch.Tensor, axis: Axis | None, span) -> torch.Tensor:
    if axis is None or span is None:
        return t
    lo, hi = span
    assert lo % axis.per == 0 and hi % axis.per == 0, (span, axis)
    return t.narrow(axis.dim, lo // axis.per, (hi - lo) // axis.per)


def slices(ckpt: dict[str, torch.Tensor], pieces: list[Piece], fmt: dict) -> dict[str, np.ndarray]:
    """Each stored tensor of a parameter made of ``pieces``: the pieces' slices, concatenated along the
    dim following rows (dim 0 when none does), keyed by the tensor's suffix."""
    out = {}
    for suffix, (rows, cols) in fmt.items():
        cut = [_cut(_cut(ckpt[pc.name.removesuffix("weight") + suffix], rows, pc.rows), cols, pc.cols)
               for pc in pieces]
        out[suffix] = torch.cat(cut, dim=rows.dim if rows is not None else 0).numpy()
    return out


def companion(param: str, suffix: str) -> str:
    """``...qkv_proj`` + ``qweight`` -> ``...qkv_proj.qweight``; ``...experts.w13`` -> ``...experts.w13_qweight``."""
    return f"{param}_{suffix}" if param.endswith((".w13", ".w2")) else f"{param}.{suffix}"


def expected(ckpt: dict[str, torch.Tensor], f: SimpleNamespace, quant: dict, lay: L,
             rank: int) -> dict[str, np.ndarray]:
    """Every stored tensor of every quantized parameter of ``rank`` (``quant``: config.json's
    ``quantization_config``), by its state-dict name."""
    fmt = formats(quant)
    out = {}
    for param, spec in matrices(f, lay, rank).items():
        stacked = isinstance(spec[0], list)
        built = [slices(ckpt, slot, fmt) for slot in (spec if stacked else [spec])]
        for suffix in fmt:
            out[companion(param, suffix)] = np.stack([b[suffix] for b in built]) if stacked else built[0][suffix]
    return out
