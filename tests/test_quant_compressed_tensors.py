"""FP8 compressed-tensors checkpoints (written by the compressed-tensors library, ``tests.ct_checkpoints``)
of llama and qwen3_moe, per channel (dynamic inputs), per tensor (static inputs, FP8 KV cache) and per
16x16 block (static inputs), loaded at world sizes 1, 2, 4 and 8 over tensor, data, pipeline and expert
parallel layouts.

Everything expected is computed here, by arithmetic written for this test, not by distload: which
rows and columns of each checkpoint FP8 matrix every rank's parameter holds (heads, KV pieces, MLP
rows, hosted experts and their expert-TP shard), hence which entries of its ``weight_scale`` (rows,
per-part values or blocks), its ``input_scale`` and the attention's ``k_scale`` / ``v_scale``; and the
checkpoint tensors each rank must own. FP8 bytes and float32 scales are read with safetensors and
compared exactly. Reference logits come from transformers on the checkpoint dequantized by
``dequantized_checkpoint`` (written from the format's definition, not with distload).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests import quant_jobs
from tests.quant_slices import Piece, block_range, part
from tests.ct_checkpoints import dequantized_checkpoint, write_ct_checkpoint
from tests.hf_checkpoints import HFSpec, hf_logits, put_tensors, read_tensors
from tests.int_slices import facts, matrices
from tests.hf_checkpoints import MOE_SPECS
from tests.layouts import L, coords, stage_of_layer
from tests.moe_oracle import moe_input_ids as input_ids

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""

MODELS = {
    # 4 heads, 2 KV heads of 16, MLP width 96: with tp 2 every shard is whole 16x16 blocks
    "llama": HFSpec(model_type="llama"),
    # q/k norms, 8 experts of width 32 (expert tp 2: 16 rows), layer 1 a dense MLP of width 96
    "qwen3_moe": MOE_SPECS["qwen3_moe"],
}

STRATEGIES = {
    "channel": dict(),                                          # dynamic per-token inputs, no KV scheme
    "tensor": dict(static_input=True, kv_cache=True),
    "block": dict(block=(16, 16), static_input=True),
}
BLOCK = (16, 16)

NOTES = {
    "channel": "quantization: compressed-tensors fp8 channel, dynamic input",
    "tensor": "quantization: compressed-tensors fp8 tensor, static input",
    "block": "quantization: compressed-tensors fp8 block 16x16, static input",
}

# (strategy, layout): each strategy at 5 layouts over both models and world sizes 1, 2, 4, 8; between
# them tp 1/2/4, KV heads replicated (llama tp 4), pipeline stages, dp replicas, ep 1 with every expert
# split over the TP pair, ep = world (expert tp 1), round-robin placement and redundant experts.
# Block is kept off tp 4 (llama's 24-row gate/up shard would cut a 16-row block; refused, not tested here).
CASES = [
    ("channel", L("llama", 1)),
    ("channel", L("llama", 4, tp=4)),                                      # k/v: 2 pieces over 4 ranks
    ("channel", L("qwen3_moe", 2, tp=2)),                                  # experts split over the pair
    ("channel", L("qwen3_moe", 4, dp=4, ep=4, placement="round_robin")),   # expert tp 1
    ("channel", L("qwen3_moe", 8, tp=2, dp=2, pp=2, ep=2, placement="round_robin")),
    ("tensor", L("llama", 2, tp=2)),
    ("tensor", L("llama", 4, tp=2, pp=2)),
    ("tensor", L("llama", 8, tp=2, dp=4)),
    ("tensor", L("qwen3_moe", 1)),
    ("tensor", L("qwen3_moe", 4, tp=2, dp=2, ep=2, redundant=2)),          # 10 slots, experts 0, 1 twice
    ("block", L("llama", 2, tp=2)),
    ("block", L("llama", 4, tp=2, pp=2)),
    ("block", L("qwen3_moe", 1)),
    ("block", L("qwen3_moe", 4, dp=4, ep=4, placement="round_robin")),
    ("block", L("qwen3_moe", 8, tp=2, dp=2, pp=2, ep=2, placement="round_robin")),
]
PARAMS = [pytest.param(s, lay, id=f"{s}-{lay.id}", marks=[pytest.mark.slow] if lay.world == 8 else [])
          for s, lay in CASES]


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
    """layers with a dense MLP"""
    intermediate: int
    expert_width: int

    @classmethod
    def of(cls, directory: str) -> "Facts":
        with open(os.path.join(directory, "config.json")) as f:
            c = json.load(f)
        layers = c["num_hidden_layers"]
        experts = c.get("num_local_experts") or c.get("num_experts") or 0
        dense = set(range(layers)) if not experts else set(c.get("mlp_only_layers") or ())
        return cls(model_type=c["model_type"], num_layers=layers, num_experts=experts,
                   heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                   dense=frozenset(dense), intermediate=c["intermediate_size"],
                   expert_width=c.get("moe_intermediate_size") or 0)


def quantized_pieces(f: Facts, lay: L, rank: int) -> dict[str, list]:
    """Every FP8 parameter of ``rank``: its parts in row order (Pieces concatenated along the rows),
    or, for stacked experts, one such list per local slot (``tests.int_slices.matrices``)."""
    pieces = matrices(facts(MODELS[f.model_type]), lay, rank)
    return {(p if p.endswith((".w13", ".w2")) else f"{p}.weight"): v for p, v in pieces.items()}


def float_pieces(f: Facts, lay: L, rank: int) -> dict[str, Piece]:
    """Every float32 parameter of ``rank`` (embedding / head rows split over tp; norms, q/k norms and
    routers whole)."""
    tp_i, _, pp_i = coords(lay, rank)
    out = {}
    for layer in range(f.num_layers):
        if stage_of_layer(f, lay, layer) != pp_i:
            continue
        p = f"model.layers.{layer}."
        names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if f.model_type == "qwen3_moe":
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            if layer not in f.dense:
                names.append(p + "mlp.gate.weight")
        out.update({n: Piece(n) for n in names})
    vocab = MODELS[f.model_type].vocab_size
    if pp_i == 0:
        out["model.embed_tokens.weight"] = Piece("model.embed_tokens.weight", rows=part(tp_i, lay.tp, vocab))
    if pp_i == lay.pp - 1:
        out["model.norm.weight"] = Piece("model.norm.weight")
        out["lm_head.weight"] = Piece("lm_head.weight", rows=part(tp_i, lay.tp, vocab))
    return out


def companion(pname: str, suffix: str) -> str:
    """``X.weight`` -> ``X.<suffix>``; ``experts.w13`` -> ``experts.w13_<suffix>``."""
    return pname.removesuffix(".weight") + "." + suffix if pname.endswith(".weight") else f"{pname}_{suffix}"


def beside(weight: str, suffix: str) -> str:
    """The checkpoint tensor ``X.<suffix>`` beside ``X.weight``."""
    return weight.removesuffix("weight") + suffix


def build(ckpt: dict[str, torch.Tensor], pieces: list[Piece], strategy: str, static: bool) -> tuple[dict, set]:
    """The FP8 bytes (uint8), ``weight_scale`` and (static inputs) ``input_scale`` of a parameter made
    of ``pieces``, keyed by suffix; and the checkpoint pieces read, as (tensor, rows, columns) of that
    tensor (None: all)."""
    ws, ss, ins, reads = [], [], [], set()
    for pc in pieces:
        w, s = ckpt[pc.name], ckpt[beside(pc.name, "weight_scale")]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, pc.name
        r = slice(*pc.rows) if pc.rows else slice(None)
        c = slice(*pc.cols) if pc.cols else slice(None)
        ws.append(w.view(torch.uint8)[r, c])
        reads.add((pc.name, pc.rows, pc.cols))
        if strategy == "channel":  # one per row: the rows' own; a column slice keeps every row
            assert s.shape == (w.shape[0], 1)
            ss.append(s[r])
            reads.add((beside(pc.name, "weight_scale"), pc.rows, None))
        elif strategy == "tensor":  # one per checkpoint matrix
            assert s.shape == (1,)
            ss.append(s)
            reads.add((beside(pc.name, "weight_scale"), None, None))
        else:
            bn, bk = BLOCK
            br, bc = block_range(pc.rows, w.shape[0], bn), block_range(pc.cols, w.shape[1], bk)
            ss.append(s[br, bc])
            reads.add((beside(pc.name, "weight_scale"), (br.start, br.stop), (bc.start, bc.stop)))
        if static:
            i = ckpt[beside(pc.name, "input_scale")]
            assert i.shape == (1,) and i.dtype == torch.float32
            ins.append(i)
            reads.add((beside(pc.name, "input_scale"), None, None))
    out = {"weight": torch.cat(ws).numpy(), "weight_scale": torch.cat(ss).numpy()}
    if static:
        out["input_scale"] = torch.cat(ins).numpy()
    return out, reads


def expected_state(ckpt, f: Facts, lay: L, rank: int, strategy: str, static: bool,
                   kv: bool) -> tuple[dict[str, np.ndarray], set[str], set[tuple]]:
    """Returns (every parameter of ``rank`` by name, FP8 ones as uint8 bytes; the names of the FP8
    ones; the checkpoint pieces ``rank`` reads, as (tensor, rows, columns))."""
    out, fp8, reads = {}, set(), set()
    for pname, spec in quantized_pieces(f, lay, rank).items():
        stacked = isinstance(spec[0], list)
        built = [build(ckpt, slot, strategy, static) for slot in (spec if stacked else [spec])]
        for suffix in built[0][0]:
            name = pname if suffix == "weight" else companion(pname, suffix)
            out[name] = np.stack([b[suffix] for b, _ in built]) if stacked else built[0][0][suffix]
        reads |= {x for _, r in built for x in r}
        fp8.add(pname)
    for pname, pc in float_pieces(f, lay, rank).items():
        out[pname] = ckpt[pc.name][slice(*pc.rows) if pc.rows else slice(None)].numpy()
        reads.add((pc.name, pc.rows, None))
    if kv:
        _, _, pp_i = coords(lay, rank)
        for layer in range(f.num_layers):
            if stage_of_layer(f, lay, layer) == pp_i:
                for s in ("k_scale", "v_scale"):
                    name = f"model.layers.{layer}.self_attn.{s}"
                    out[name] = ckpt[name].numpy()
                    reads.add((name, None, None))
    return out, fp8, reads


# ---------------------------------------------------------------- checkpoints and runs


def distinguish_input_scales(directory: str) -> None:
    """Makes every ``input_scale`` of the checkpoint a value of its own (the i-th, by name, times
    1 + (i + 1) / 256). Calibration gives q, k and v (and gate and up) the same scale, as they see
    the same input, so without this a static scale read into the wrong part of a fused layer would
    go unseen. Neither the dequantized reference nor distload's CPU forward uses input scales."""
    tensors = read_tensors(directory)
    names = sorted(n for n in tensors if n.endswith(".input_scale"))
    put_tensors(directory, {n: tensors[n] * (1 + (i + 1) / 256) for i, n in enumerate(names)})
    values = [v.item() for n, v in read_tensors(directory).items() if n.endswith(".input_scale")]
    assert len(set(values)) == len(values) == len(names)


class Checkpoints:
    """Each (model, strategy)'s checkpoint, its dequantized copy, transformers' logits on that copy,
    and the load results, each made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self._made: dict[tuple[str, str], dict] = {}
        self._runs: dict[tuple[str, L], list] = {}

    def get(self, model: str, strategy: str) -> dict:
        key = (model, strategy)
        if key not in self._made:
            d = self.root / f"{model}-{strategy}"
            ct = write_ct_checkpoint(str(d / "ct"), MODELS[model], strategy=strategy, **STRATEGIES[strategy])
            deq = dequantized_checkpoint(ct, str(d / "deq"))
            distinguish_input_scales(ct)
            self._made[key] = {"ct": ct, "deq": deq, "facts": Facts.of(ct), "tensors": read_tensors(ct),
                               "ref": hf_logits(deq, input_ids())}
        return self._made[key]

    def run(self, strategy: str, lay: L) -> list[dict]:
        key = (strategy, lay)
        if key not in self._runs:
            options = {**lay.options(), "dtype": "float32"}
            self._runs[key] = self.pool.run(lay.world, quant_jobs.load_quantized, self.get(lay.model, strategy)["ct"],
                                            options, input_ids(), raise_errors=True)
        return self._runs[key]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("quant-ct"), pool)


def test_layouts_cover_each_strategy_and_read_every_checkpoint_tensor(ckpts):
    """Each strategy runs at 4+ layouts over both models and world sizes 1 to 8; by this file's
    arithmetic the ranks of every layout together read every tensor of the checkpoint (FP8 matrices,
    every scale), so the exact comparisons below leave none out."""
    for strategy in STRATEGIES:
        lays = [lay for s, lay in CASES if s == strategy]
        assert len(lays) >= 4 and {lay.model for lay in lays} == set(MODELS), strategy
        assert {lay.world for lay in lays} == {1, 2, 4, 8}, strategy
    for strategy, lay in CASES:
        c = ckpts.get(lay.model, strategy)
        static, kv = STRATEGIES[strategy].get("static_input", False), STRATEGIES[strategy].get("kv_cache", False)
        reads = set()
        for rank in range(lay.world):
            reads |= {name for name, _, _ in expected_state(c["tensors"], c["facts"], lay, rank, strategy,
                                                            static, kv)[2]}
        assert reads == set(c["tensors"]), (strategy, lay.id, sorted(reads ^ set(c["tensors"]))[:5])


def test_strategies_round_differently_by_far_more_than_the_tolerance(ckpts):
    """The three dequantized references of a model differ pairwise by far more than TOLERANCE, so
    matching one shows its own scales were applied, each to the right rows / block."""
    for model in MODELS:
        refs = {s: ckpts.get(model, s)["ref"] for s in STRATEGIES}
        for a in STRATEGIES:
            for b in STRATEGIES:
                if a < b:
                    err = ((refs[a] - refs[b]).abs().max() / refs[a].abs().max()).item()
                    assert err > 100 * TOLERANCE, (model, a, b, err)


# ---------------------------------------------------------------- 1. exact slices


@pytest.mark.parametrize("strategy,lay", PARAMS)
def test_fp8_weights_and_scales_are_exact_checkpoint_slices(ckpts, strategy, lay):
    c = ckpts.get(lay.model, strategy)
    static, kv = STRATEGIES[strategy].get("static_input", False), STRATEGIES[strategy].get("kv_cache", False)
    for rank, got in enumerate(ckpts.run(strategy, lay)):
        assert got["raised"] is False, f"rank {rank}"
        want, fp8, _ = expected_state(c["tensors"], c["facts"], lay, rank, strategy, static, kv)
        state = got["state"]
        assert sorted(state) == sorted(want), f"rank {rank}: {sorted(set(state) ^ set(want))[:6]}"
        for pname, w in want.items():
            have = state[pname]
            if pname in fp8:
                assert isinstance(have, tuple), f"rank {rank}: {pname} is not FP8"
                tag, dtype, raw = have
                assert (tag, dtype) == ("fp8", "torch.float8_e4m3fn"), pname
                assert raw.shape == w.shape and np.array_equal(raw, w), f"rank {rank}: {pname} bytes differ"
            else:
                assert isinstance(have, np.ndarray) and have.dtype == np.float32, f"rank {rank}: {pname}"
                assert have.shape == w.shape, f"rank {rank}: {pname} shape {have.shape} != {w.shape}"
                assert np.array_equal(have, w), f"rank {rank}: {pname} differs"


# ---------------------------------------------------------------- 2. report


@pytest.mark.parametrize("strategy,lay", PARAMS)
def test_report_is_complete_with_every_scale_tracked_and_names_the_scheme(ckpts, strategy, lay):
    c = ckpts.get(lay.model, strategy)
    static, kv = STRATEGIES[strategy].get("static_input", False), STRATEGIES[strategy].get("kv_cache", False)
    out = ckpts.run(strategy, lay)
    for rank, got in enumerate(out):
        report = got["report"]
        assert report["complete"] is True and report["ok"] is True, f"rank {rank}"
        assert report["layout"] == {"world_size": lay.world, "tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep}
        # "defaulted" empty: the k/v scales of the kv checkpoints were read, not defaulted to 1.0
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched", "nonfinite", "ignored"):
            assert report[kind] == [], (rank, kind, report[kind])
        assert NOTES[strategy] in report["notes"], report["notes"]
        assert report == {**out[0]["report"], "seconds": report["seconds"]}
    # one unit per distinct piece of a checkpoint tensor (scales included); each rank owns and
    # loads one piece of every tensor it reads
    pieces = [expected_state(c["tensors"], c["facts"], lay, rank, strategy, static, kv)[2] for rank in range(lay.world)]
    report = out[0]["report"]
    assert report["num_units"] == len(set().union(*pieces))
    for rank, stats in enumerate(report["ranks"]):
        assert stats["units_owned"] == stats["units_loaded"] == len({n for n, _, _ in pieces[rank]}), f"rank {rank}"
        assert stats["units_not_loaded"] == 0


# ---------------------------------------------------------------- 3. logits


@pytest.mark.parametrize("strategy,lay", PARAMS)
def test_logits_match_transformers_on_the_dequantized_checkpoint(ckpts, strategy, lay):
    ref = ckpts.get(lay.model, strategy)["ref"]
    for rank, got in enumerate(ckpts.run(strategy, lay)):
        _, _, pp_i = coords(lay, rank)
        if pp_i != lay.pp - 1:
            assert got["logits"] is None, f"rank {rank}"
            continue
        logits = torch.from_numpy(got["logits"])
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        err = ((logits - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"
