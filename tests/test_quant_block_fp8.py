"""Block-FP8 checkpoints (DeepSeek-V3 format, written by ``tests.fp8_checkpoints``) of llama,
qwen3_moe, mixtral and deepseek_v3 loaded at world sizes 1, 2, 4 and 8 over tensor, data,
pipeline and expert parallel layouts.

Everything expected is computed here, by arithmetic written for this test, not by distload:
which rows and columns of each checkpoint FP8 matrix every rank's parameter holds (by heads,
KV pieces, MLP rows, hosted experts and their expert-TP shard) and hence which scale blocks;
which checkpoint tensors a layout's TP or expert-TP shard would cut a scale block of. The FP8
bytes and the scales are read with safetensors and compared exactly. Reference logits come
from transformers on the checkpoint dequantized by the test writer (``write_dequantized_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests import quant_jobs
from tests.devices import and_on_gpus
from tests.quant_slices import Piece, block_range, part
from tests.fp8_checkpoints import (
    FP8_DTYPE,
    is_quantized,
    scale_name,
    write_block_fp8_checkpoint,
    write_dequantized_checkpoint,
)
from tests.hf_checkpoints import HFSpec, hf_logits, read_tensors, write_hf_checkpoint
from tests.hf_checkpoints import DEEPSEEK_V3 as DEEPSEEK_SPEC
from tests.hf_checkpoints import MOE_SPECS
from tests.layouts import L, coords, hosted, stage_of_layer
from tests.moe_oracle import deepseek_input_ids, moe_input_ids

pytest.importorskip("transformers")

TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""

# model -> (spec, weight_block_size [bn, bk]); every TP / expert-TP shard of the layouts below
# is whole blocks: llama q 16/32/64 rows, k/v 16 or 32, o 16/32 columns, gate/up 32/64 rows
# (intermediate 128), down 32/64 columns; qwen3_moe / mixtral experts 16 or 32 rows (width 32),
# qwen3_moe's dense layer 48 rows (96 / 2); deepseek_v3 ([8, 8] blocks) q_b_proj 24 rows per TP
# rank, kv_b_proj 32, o_proj 16 columns, experts and the shared expert 8 rows
# the sources are bf16 checkpoints written by transformers, as released FP8 checkpoints come
# from bf16 models (norms, embeddings, routers and the LM head stay bf16 beside the FP8 weights)
MODELS = {
    "llama": (HFSpec(model_type="llama", intermediate_size=128, seed=41, dtype="bfloat16"), (16, 16)),
    "qwen3_moe": (dataclasses.replace(MOE_SPECS["qwen3_moe"], dtype="bfloat16"), (16, 16)),
    "mixtral": (dataclasses.replace(MOE_SPECS["mixtral"], dtype="bfloat16"), (16, 16)),
    "deepseek_v3": (dataclasses.replace(DEEPSEEK_SPEC, dtype="bfloat16"), (8, 8)),
}

LAYOUTS = [
    L("llama", 1),
    L("llama", 2, tp=2),
    L("llama", 4, tp=4),                                     # 2 KV heads over 4 ranks: each replicated twice
    L("llama", 4, tp=2, pp=2),
    L("llama", 8, tp=4, dp=2),
    L("qwen3_moe", 2, tp=2),                                 # ep 1: every expert split over the TP pair
    L("qwen3_moe", 4, dp=4, ep=4, placement="round_robin"),  # expert tp 1: experts g, g + 4 on rank g
    L("qwen3_moe", 8, tp=2, dp=2, pp=2, ep=2),               # stages of 2 and 1 layers, expert tp 2
    L("mixtral", 4, tp=2, dp=2, ep=2, redundant=2),          # 10 slots: experts 0, 1 on both groups
    L("mixtral", 8, tp=2, dp=4, ep=4),                       # 2 experts per group of 2 ranks
    L("deepseek_v3", 1),
    L("deepseek_v3", 2, tp=2),
    L("deepseek_v3", 4, tp=2, pp=2),  # stages: dense layer 0 and MoE layer 1 on the first, MoE layer 2 last
    L("deepseek_v3", 8, tp=2, dp=4, ep=4),
]
PARAMS = [pytest.param(lay, id=lay.id, marks=[pytest.mark.slow] if lay.world == 8 else []) for lay in LAYOUTS]
ON_DEVICES = and_on_gpus(PARAMS, lambda lay: lay.world)


# ---------------------------------------------------------------- the layout's slices, by hand


@dataclass(frozen=True)
class Facts:
    """What a layout's slices depend on, read from config.json."""

    model_type: str
    num_layers: int
    num_experts: int
    heads: int
    kv_heads: int
    head_dim: int
    dense: frozenset[int]
    """layers with a dense MLP (``mlp.gate_proj / up_proj / down_proj``)"""
    intermediate: int
    """dense MLP width"""
    expert_width: int
    shared_width: int
    """DeepSeek's shared expert (0: none)"""
    mla: tuple[int, int, int] = (0, 0, 0)
    """DeepSeek's q_b_proj rows per head, kv_b_proj rows per head, o_proj columns per head"""

    @classmethod
    def of(cls, directory: str) -> "Facts":
        with open(os.path.join(directory, "config.json")) as f:
            c = json.load(f)
        mt, layers = c["model_type"], c["num_hidden_layers"]
        if mt == "llama":
            experts, dense, width = 0, set(range(layers)), 0
        elif mt == "deepseek_v3":
            experts, dense, width = c["n_routed_experts"], set(range(c["first_k_dense_replace"])), \
                c["moe_intermediate_size"]
        elif mt == "mixtral":
            experts, dense, width = c["num_local_experts"], set(), c["intermediate_size"]
        else:  # qwen3_moe (transformers 5 writes num_experts as num_local_experts)
            experts = c.get("num_local_experts") or c["num_experts"]
            dense, width = set(c.get("mlp_only_layers") or ()), c["moe_intermediate_size"]
        mla = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["qk_nope_head_dim"] + c["v_head_dim"],
               c["v_head_dim"]) if mt == "deepseek_v3" else (0, 0, 0)
        return cls(model_type=mt, num_layers=layers, num_experts=experts, heads=c["num_attention_heads"],
                   kv_heads=c["num_key_value_heads"], head_dim=c.get("head_dim") or 0, dense=frozenset(dense),
                   intermediate=c["intermediate_size"], expert_width=width,
                   shared_width=(c.get("n_shared_experts") or 0) * width if mt == "deepseek_v3" else 0, mla=mla)

    @property
    def block(self) -> str:
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def expert_names(self, layer: int, e: int) -> tuple[str, str, str]:
        """gate, up, down of expert ``e`` in ``layer``."""
        p = f"model.layers.{layer}.{self.block}.experts.{e}."
        if self.model_type == "mixtral":
            return p + "w1.weight", p + "w3.weight", p + "w2.weight"
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def expected_pieces(f: Facts, lay: L, rank: int) -> dict[str, list]:
    """Every FP8 parameter of ``rank``: its parts in row order (a list of Pieces concatenated
    along the rows), or for stacked experts one such list per local slot."""
    tp = lay.tp
    tp_i, _, pp_i = coords(lay, rank)
    out: dict[str, list] = {}
    for layer in range(f.num_layers):
        if stage_of_layer(f, lay, layer) != pp_i:
            continue
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        if f.model_type == "deepseek_v3":
            qk, kv, v = f.mla
            out[a + "q_a_proj.weight"] = [Piece(a + "q_a_proj.weight")]  # replicated
            out[a + "kv_a_proj_with_mqa.weight"] = [Piece(a + "kv_a_proj_with_mqa.weight")]
            out[a + "q_b_proj.weight"] = [Piece(a + "q_b_proj.weight", rows=part(tp_i, tp, f.heads * qk))]
            out[a + "kv_b_proj.weight"] = [Piece(a + "kv_b_proj.weight", rows=part(tp_i, tp, f.heads * kv))]
            out[a + "o_proj.weight"] = [Piece(a + "o_proj.weight", cols=part(tp_i, tp, f.heads * v))]
        else:
            hd = f.head_dim
            pieces = min(tp, f.kv_heads)  # KV heads: at most one piece per head, replicated beyond
            kv_i = tp_i // (tp // pieces)
            out[a + "qkv_proj.weight"] = [Piece(a + "q_proj.weight", rows=part(tp_i, tp, f.heads * hd)),
                                          Piece(a + "k_proj.weight", rows=part(kv_i, pieces, f.kv_heads * hd)),
                                          Piece(a + "v_proj.weight", rows=part(kv_i, pieces, f.kv_heads * hd))]
            out[a + "o_proj.weight"] = [Piece(a + "o_proj.weight", cols=part(tp_i, tp, f.heads * hd))]
        b = p + f.block + "."
        mlps = [(b, f.intermediate)] if layer in f.dense else []
        if layer not in f.dense and f.shared_width:
            mlps.append((b + "shared_experts.", f.shared_width))
        for m, width in mlps:
            out[m + "gate_up_proj.weight"] = [Piece(m + "gate_proj.weight", rows=part(tp_i, tp, width)),
                                              Piece(m + "up_proj.weight", rows=part(tp_i, tp, width))]
            out[m + "down_proj.weight"] = [Piece(m + "down_proj.weight", cols=part(tp_i, tp, width))]
        if layer in f.dense:
            continue
        experts, shard, etp = hosted(f, lay, rank)
        mine = part(shard, etp, f.expert_width)
        w13, w2 = [], []
        for e in experts:
            gate, up, down = f.expert_names(layer, e)
            w13.append([Piece(gate, rows=mine), Piece(up, rows=mine)])
            w2.append([Piece(down, cols=mine)])
        out[b + "experts.w13"], out[b + "experts.w2"] = w13, w2
    return out


def scale_param(pname: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``; ``experts.w13`` -> ``experts.w13_weight_scale_inv``."""
    return pname.removesuffix(".weight") + ".weight_scale_inv" if pname.endswith(".weight") \
        else pname + "_weight_scale_inv"


def build(ckpt: dict[str, torch.Tensor], pieces: list[Piece], block) -> tuple[np.ndarray, np.ndarray]:
    """(FP8 bytes as uint8, float32 scales) of a parameter made of ``pieces``."""
    bn, bk = block
    ws, ss = [], []
    for pc in pieces:
        w, s = ckpt[pc.name], ckpt[scale_name(pc.name)]
        assert w.dtype == FP8_DTYPE and s.dtype == torch.float32, pc.name
        r = slice(*pc.rows) if pc.rows else slice(None)
        c = slice(*pc.cols) if pc.cols else slice(None)
        ws.append(w.view(torch.uint8)[r, c])
        ss.append(s[block_range(pc.rows, w.shape[0], bn), block_range(pc.cols, w.shape[1], bk)])
    return torch.cat(ws).numpy(), torch.cat(ss).numpy()


def expected_state(ckpt, f: Facts, lay: L, rank: int, block) -> dict[str, np.ndarray]:
    """FP8 parameters (uint8 bytes) and their scales, by parameter name."""
    out = {}
    for pname, spec in expected_pieces(f, lay, rank).items():
        if spec and isinstance(spec[0], list):  # stacked expert slots
            built = [build(ckpt, slot, block) for slot in spec]
            w, s = np.stack([x for x, _ in built]), np.stack([y for _, y in built])
        else:
            w, s = build(ckpt, spec, block)
        out[pname], out[scale_param(pname)] = w, s
    return out


def split_dims(f: Facts, lay: L) -> dict[str, tuple[int, int, int]]:
    """Checkpoint FP8 matrices a layout splits -> (dim, its length, into how many pieces)."""
    etp = lay.tp if lay.ep == 1 else lay.tp * lay.dp // lay.ep
    out = {}
    for layer in range(f.num_layers):
        a = f"model.layers.{layer}.self_attn."
        if f.model_type == "deepseek_v3":
            qk, kv, v = f.mla
            out.update({a + "q_b_proj.weight": (0, f.heads * qk, lay.tp),
                        a + "kv_b_proj.weight": (0, f.heads * kv, lay.tp),
                        a + "o_proj.weight": (1, f.heads * v, lay.tp)})
        else:
            hd, pieces = f.head_dim, min(lay.tp, f.kv_heads)
            out.update({a + "q_proj.weight": (0, f.heads * hd, lay.tp),
                        a + "k_proj.weight": (0, f.kv_heads * hd, pieces),
                        a + "v_proj.weight": (0, f.kv_heads * hd, pieces),
                        a + "o_proj.weight": (1, f.heads * hd, lay.tp)})
        m = f"model.layers.{layer}.{f.block}."
        if layer in f.dense:
            mlps = [((m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight"), f.intermediate, lay.tp)]
        else:
            mlps = [(f.expert_names(layer, e), f.expert_width, etp) for e in range(f.num_experts)]
            if f.shared_width:
                s = m + "shared_experts."
                mlps.append(((s + "gate_proj.weight", s + "up_proj.weight", s + "down_proj.weight"), f.shared_width,
                             lay.tp))
        for (gate, up, down), width, n in mlps:
            out.update({gate: (0, width, n), up: (0, width, n), down: (1, width, n)})
    return out


def cut_tensors(f: Facts, lay: L, block) -> set[str]:
    """The checkpoint FP8 matrices whose pieces under ``lay`` do not consist of whole blocks."""
    return {name for name, (dim, size, n) in split_dims(f, lay).items() if n > 1 and (size // n) % block[dim]}


# ---------------------------------------------------------------- checkpoints and runs


class Checkpoints:
    """Each model's float32, FP8 and dequantized checkpoints, transformers' logits and the load
    results, each made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self._made: dict[str, dict] = {}
        self._runs: dict[L, list] = {}
        self.cache: dict[tuple, list] = {}

    def get(self, model: str) -> dict:
        if model not in self._made:
            spec, block = MODELS[model]
            d = self.root / model
            f32 = write_hf_checkpoint(str(d / "f32"), spec)
            fp8 = write_block_fp8_checkpoint(f32, str(d / "fp8"), block=block)
            deq = write_dequantized_checkpoint(fp8, str(d / "deq"))
            self._made[model] = {"f32": f32, "fp8": fp8, "deq": deq, "block": block, "facts": Facts.of(fp8),
                                 "tensors": read_tensors(fp8),
                                 "quantized": {n for n, t in read_tensors(f32).items() if is_quantized(n, t.shape)}}
        return self._made[model]

    def ids(self, model: str) -> torch.Tensor:
        return deepseek_input_ids() if model == "deepseek_v3" else moe_input_ids()

    def reference(self, model: str) -> torch.Tensor:
        c = self.get(model)
        if "ref" not in c:
            c["ref"] = hf_logits(c["deq"], self.ids(model))
        return c["ref"]

    def run(self, lay: L, ranks) -> list[dict]:
        if (lay, ranks.device) not in self._runs:
            options = {**lay.options(), "dtype": "float32"}
            self._runs[lay, ranks.device] = ranks.run(lay.world, quant_jobs.load_quantized,
                                                      self.get(lay.model)["fp8"], options, self.ids(lay.model),
                                                      ranks.device, raise_errors=True)
        return self._runs[lay, ranks.device]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("quant-block-fp8"), pool)


def test_slices_of_the_layouts_are_whole_blocks_and_cover_every_fp8_tensor(ckpts):
    """The layouts above cut no block (by this file's arithmetic), and together the parameters
    of each layout's ranks read every FP8 matrix of the checkpoint."""
    for lay in LAYOUTS:
        c = ckpts.get(lay.model)
        assert cut_tensors(c["facts"], lay, c["block"]) == set(), lay.id
        fp8 = {n for n, t in c["tensors"].items() if t.dtype == FP8_DTYPE}
        assert fp8 == c["quantized"]
        read = set()
        for rank in range(lay.world):
            for spec in expected_pieces(c["facts"], lay, rank).values():
                for pc in (x for slot in spec for x in (slot if isinstance(slot, list) else [slot])):
                    read.add(pc.name)
        assert read == fp8, (lay.id, sorted(fp8 ^ read)[:5])


# ---------------------------------------------------------------- 1. exact slices


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_fp8_weights_and_scales_are_exact_slices(ckpts, lay, ranks):
    c = ckpts.get(lay.model)
    out = ckpts.run(lay, ranks)
    for rank, got in enumerate(out):
        report = got["report"]
        assert got["raised"] is False and report["complete"] is True and report["ok"] is True, f"rank {rank}"
        assert report["layout"] == {"world_size": lay.world, "tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep}
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched", "nonfinite"):
            assert report[kind] == [], (kind, report[kind])

        want = expected_state(c["tensors"], c["facts"], lay, rank, c["block"])
        state = got["state"]
        fp8 = {n for n, v in state.items() if isinstance(v, tuple)}
        scales = {n for n in state if n.endswith("weight_scale_inv")}
        assert sorted(fp8 | scales) == sorted(want), f"rank {rank}"
        for pname, w in want.items():
            have = state[pname]
            if pname in fp8:
                tag, dtype, raw = have
                assert (tag, dtype) == ("fp8", "torch.float8_e4m3fn"), pname
                assert raw.shape == w.shape and np.array_equal(raw, w), f"rank {rank}: {pname} bytes differ"
            else:
                assert have.dtype == np.float32, pname
                assert have.shape == w.shape and np.array_equal(have, w), f"rank {rank}: {pname} scales differ"


# ---------------------------------------------------------------- 2. logits


def test_fp8_rounding_moves_the_reference_logits_beyond_the_tolerance(ckpts):
    """The dequantized reference differs from the float32 original by far more than TOLERANCE,
    so matching it shows every scale was applied to the right block."""
    for model in MODELS:
        ref = ckpts.reference(model)
        orig = hf_logits(ckpts.get(model)["f32"], ckpts.ids(model))
        assert ((orig - ref).abs().max() / ref.abs().max()).item() > 100 * TOLERANCE, model


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_logits_match_transformers_on_the_dequantized_checkpoint(ckpts, lay, ranks):
    ref = ckpts.reference(lay.model)
    for rank, got in enumerate(ckpts.run(lay, ranks)):
        _, _, pp_i = coords(lay, rank)
        if pp_i != lay.pp - 1:
            assert got["logits"] is None, f"rank {rank}"
            continue
        logits = torch.from_numpy(got["logits"])
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        err = ((logits - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


# ---------------------------------------------------------------- 3. a shard that cuts a block


# (model, block of a checkpoint written for the refusal, layout, the kind of shard that cuts)
REFUSED = [
    # [16, 32] blocks, tp 4: o_proj's 16-column shard cuts a 32-column block; everything else whole
    ("llama", (16, 32), L("llama", 4, tp=4), "TP shard of 16 columns cuts a scale block of 32"),
    # tp 4, ep 1: every expert over 4 ranks, 8 of its 32 rows (w1 / w3) and columns (w2) per rank
    ("mixtral", (16, 16), L("mixtral", 4, tp=4), "expert TP shard of 8 rows cuts a scale block of 16"),
    # [8, 8] blocks, tp 4: q_b_proj 48 rows / 4 = 12 per rank
    ("deepseek_v3", (8, 8), L("deepseek_v3", 4, tp=4), "TP shard of 12 rows cuts a scale block of 8"),
]


def refusals(ckpts: Checkpoints, model: str, block, lay: L) -> list[str]:
    """Each rank's load_error text for ``lay`` on ``model``'s checkpoint with ``block`` (made once)."""
    key = ("refused", model, tuple(block), lay)
    if key not in ckpts.cache:
        c = ckpts.get(model)
        directory = c["fp8"] if tuple(block) == tuple(c["block"]) else \
            write_block_fp8_checkpoint(c["f32"], str(ckpts.root / f"{model}-{block[0]}x{block[1]}"), block=block)
        ckpts.cache[key] = ckpts.pool.run(lay.world, quant_jobs.load_error, directory,
                                          {**lay.options(), "dtype": "float32"})
    return ckpts.cache[key]


def named_tensor(err: str) -> str:
    found = re.search(r"\btensor (\S+?)[,\]]", err)
    assert found, err
    return found.group(1)


@pytest.mark.parametrize("model,block,lay,what", REFUSED, ids=[r[2].id for r in REFUSED])
def test_shard_cutting_a_scale_block_is_refused_naming_the_tensor(ckpts, model, block, lay, what):
    c = ckpts.get(model)
    cut = cut_tensors(c["facts"], lay, block)
    assert cut
    for rank, err in enumerate(refusals(ckpts, model, block, lay)):
        assert err.startswith("PlanError: ") and "cuts a scale block" in err and what in err, f"rank {rank}: {err}"
        named = named_tensor(err)
        assert "{expert}" not in named and named in cut, f"rank {rank}: {err} (cut: {sorted(cut)[:4]})"

