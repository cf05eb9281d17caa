"""int4 / int8 checkpoints loaded at world sizes 1, 2 and 4 over tensor, data, pipeline and expert
parallel layouts: compressed-tensors ``pack-quantized`` (written by compressed-tensors 0.20 itself,
``tests.ct_int_checkpoints``) and GPTQ (written from the format's definition, ``tests.gptq_checkpoints``,
whose conventions are pinned here against values worked out by hand), for llama and qwen3_moe.

Expected slices come from ``tests.int_slices`` (rank arithmetic and format layouts written by hand):
every packed tensor, scale, zero point, ``weight_shape`` and ``g_idx`` of every rank equals its
checkpoint slice exactly, dtype included. Reference logits come from transformers on the checkpoint
dequantized independently (by the library's own decompression for compressed-tensors, by the
format's definition for GPTQ), compared in float32.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from distload import LoadConfig, PlanError
from distload.dryrun import dry_run
from tests import quant_jobs
from tests.ct_int_checkpoints import dequantized_int_checkpoint, write_ct_int_checkpoint
from tests.gptq_checkpoints import SCHEMES as GPTQ_SCHEMES, dequantized_gptq_checkpoint, pack_words, quantize, \
    write_gptq_checkpoint
from tests.hf_checkpoints import HFSpec, copy_checkpoint, delete_tensors, hf_logits, put_tensors, read_tensors, \
    write_hf_checkpoint
from tests.int_slices import expected, facts, matrices
from tests.layouts import L, coords

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 120], [8, 1, 77, 33, 12, 90, 4]])

MODELS = {
    # 4 heads of 32, 2 KV heads, MLP width 256, biases on q/k/v/o (a quantized layer's bias is a unit)
    "llama": HFSpec(model_type="llama", hidden_size=128, intermediate_size=256, head_dim=32, seed=21,
                    extra={"attention_bias": True}),
    # 8 experts of width 64 (expert tp 2: 32 rows / columns), layer 1 a dense MLP of width 256
    "qwen3_moe": HFSpec(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, head_dim=32, seed=22,
                        extra={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                               "norm_topk_prob": True, "mlp_only_layers": [1]}),
}

SCHEMES = {  # compressed-tensors: bits, group size (None: per channel), symmetric; GPTQ: tests.gptq_checkpoints
    "ct-int4-g32": dict(bits=4, group_size=32, symmetric=True),
    "ct-int4-g64-asym": dict(bits=4, group_size=64, symmetric=False),
    "ct-int8-channel": dict(bits=8, group_size=None, symmetric=True),
    "ct-int8-g32-asym": dict(bits=8, group_size=32, symmetric=False),
    **GPTQ_SCHEMES,
}

NOTES = {
    "ct-int4-g32": "quantization: compressed-tensors int4 group 32, weight-only",
    "ct-int4-g64-asym": "quantization: compressed-tensors int4 group 64 asymmetric, weight-only",
    "ct-int8-channel": "quantization: compressed-tensors int8 channel, weight-only",
    "ct-int8-g32-asym": "quantization: compressed-tensors int8 group 32 asymmetric, weight-only",
    "gptq-int4-g32": "quantization: gptq int4 group 32 (gptq)",
    "gptq-int4-g64-desc": "quantization: gptq int4 group 64, desc_act (gptq)",
    "gptq-int4-g32-desc-v2": "quantization: gptq int4 group 32, desc_act (gptq_v2)",
    "gptq-int8-g64-v2": "quantization: gptq int8 group 64 (gptq_v2)",
    "gptq-int8-channel": "quantization: gptq int8 channel (gptq)",
}

# worlds 1, 2, 4 over both formats and models: tp 1/2/4 (llama's KV heads replicated at tp 4), a
# pipeline, ep 1 with every expert split over the TP pair, ep = world, expert tp 2 under ep 2;
# GPTQ desc_act at tp 4 keeps o_proj's scales whole (64-column groups over 32-column shards)
CASES = [
    ("ct-int4-g32", L("llama", 1)),
    ("ct-int4-g32", L("llama", 4, tp=4)),
    ("ct-int4-g32", L("qwen3_moe", 2, tp=2)),
    ("ct-int4-g64-asym", L("llama", 2, tp=2)),
    ("ct-int4-g64-asym", L("qwen3_moe", 4, tp=2, dp=2, ep=4)),
    ("ct-int8-channel", L("qwen3_moe", 1)),
    ("ct-int8-channel", L("llama", 4, tp=2, pp=2)),
    ("ct-int8-g32-asym", L("qwen3_moe", 4, tp=2, dp=2, ep=2, placement="round_robin")),
    ("gptq-int4-g32", L("llama", 1)),
    ("gptq-int4-g64-desc", L("llama", 4, tp=4)),
    ("gptq-int4-g32-desc-v2", L("qwen3_moe", 2, tp=2)),
    ("gptq-int8-g64-v2", L("llama", 2, tp=2)),
    ("gptq-int8-channel", L("qwen3_moe", 4, dp=4, ep=4)),
    ("gptq-int4-g32", L("qwen3_moe", 4, tp=2, dp=2, ep=2)),
]
SLOW = {("ct-int8-channel", L("llama", 4, tp=2, pp=2)), ("gptq-int8-channel", L("qwen3_moe", 4, dp=4, ep=4)),
        ("ct-int4-g32", L("qwen3_moe", 2, tp=2))}
PARAMS = [pytest.param(s, lay, id=f"{s}-{lay.id}", marks=[pytest.mark.slow] if (s, lay) in SLOW else [])
          for s, lay in CASES]


class Checkpoints:
    """Each (model, scheme)'s checkpoint, its dequantized twin, transformers' logits on the twin and
    the load results, each made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self._made: dict[tuple[str, str], dict] = {}
        self._float: dict[str, str] = {}
        self._runs: dict[tuple[str, L], list] = {}

    def get(self, model: str, scheme: str) -> dict:
        key = (model, scheme)
        if key not in self._made:
            d = self.root / f"{model}-{scheme}"
            if scheme.startswith("ct-"):
                q = write_ct_int_checkpoint(str(d / "q"), MODELS[model], **SCHEMES[scheme])
                deq = dequantized_int_checkpoint(q, str(d / "deq"))
            else:
                if model not in self._float:
                    self._float[model] = write_hf_checkpoint(str(self.root / f"{model}-f32"), MODELS[model])
                q = write_gptq_checkpoint(self._float[model], str(d / "q"), **SCHEMES[scheme])
                deq = dequantized_gptq_checkpoint(q, str(d / "deq"))
            with open(os.path.join(q, "config.json")) as f:
                quant = json.load(f)["quantization_config"]
            self._made[key] = {"q": q, "deq": deq, "facts": facts(MODELS[model]), "quant": quant,
                               "tensors": read_tensors(q), "ref": hf_logits(deq, IDS)}
        return self._made[key]

    def run(self, scheme: str, lay: L) -> list[dict]:
        key = (scheme, lay)
        if key not in self._runs:
            self._runs[key] = self.pool.run(lay.world, quant_jobs.load_quantized, self.get(lay.model, scheme)["q"],
                                            {**lay.options(), "dtype": "float32"}, IDS, raise_errors=True)
        return self._runs[key]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("quant-int"), pool)


# ------------------------------------------------------------------ the GPTQ writer, against hand values


def test_gptq_words_are_the_formats_own_bits():
    """Worked out by hand from the format (value k of a word at bits [k * bits, (k + 1) * bits)):
    4-bit 0..7 down a column is 0x76543210, 8..15 is 0xFEDCBA98 (negative as int32); zero points 8
    of a symmetric 4-bit layer are stored 7 each (0x77777777) in the gptq format, 8 in gptq_v2."""
    q = torch.arange(16).reshape(16, 1)
    assert pack_words(q, 4, dim=0).flatten().tolist() == [0x76543210, 0xFEDCBA98 - 2 ** 32]
    assert pack_words(torch.tensor([[1, 2, 3, 4]]), 8, dim=1).tolist() == [[0x04030201]]
    w = torch.linspace(-1, 1, 8 * 16).reshape(8, 16)
    v1 = quantize(w, bits=4, group_size=8, sym=True, desc_act=False, v2=False)
    v2 = quantize(w, bits=4, group_size=8, sym=True, desc_act=False, v2=True)
    assert v1["qzeros"].tolist() == [[0x77777777], [0x77777777]]
    assert v2["qzeros"].tolist() == [[0x88888888 - 2 ** 32], [0x88888888 - 2 ** 32]]
    assert torch.equal(v1["qweight"], v2["qweight"]) and v1["g_idx"].tolist() == [i // 8 for i in range(16)]
    # row 0 is -1.0 .. -0.89 over columns 0..7: scale 2 * 1.0 / 15 (float16), q = round(w / s) + 8
    s = torch.tensor(2 / 15, dtype=torch.float16).item()
    assert v1["scales"][0, 0].item() == s
    assert [v1["q"][i, 0].item() for i in range(8)] == [round(w[0, i].item() / s) + 8 for i in range(8)]


def _hand_value(t: dict, prefix: str, o: int, i: int, bits: int, v2: bool) -> float:
    """``W[o, i]`` of the checkpoint layer ``prefix``, with Python ints: shift and mask the words."""
    per, mask = 32 // bits, (1 << bits) - 1
    g = int(t[prefix + ".g_idx"][i])
    q = (int(t[prefix + ".qweight"][i // per, o]) & 0xFFFFFFFF) >> (bits * (i % per)) & mask
    z = ((int(t[prefix + ".qzeros"][g, o // per]) & 0xFFFFFFFF) >> (bits * (o % per)) & mask) + (0 if v2 else 1)
    return float(t[prefix + ".scales"][g, o].float()) * (q - z)


@pytest.mark.parametrize("scheme, model", [("gptq-int4-g32", "llama"), ("gptq-int4-g64-desc", "llama"),
                                           ("gptq-int4-g32-desc-v2", "qwen3_moe")])
def test_gptq_weights_equal_values_computed_by_hand(ckpts, scheme, model):
    """A few weights of the loaded model (world 1) and of the dequantized reference, against the
    format's arithmetic done element by element in Python ints."""
    c = ckpts.get(model, scheme)
    t, ref = c["tensors"], read_tensors(c["deq"])
    v2 = SCHEMES[scheme].get("v2", False)
    got = ckpts.pool.run(1, quant_jobs.load_dequantized, c["q"], {"dtype": "float32"})[0]
    picks = [("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.qkv_proj.weight", 128, 3, 45),
             ("model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.o_proj.weight", 0, 100, 127),
             ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_up_proj.weight", 256, 17, 64)]
    if model == "qwen3_moe":
        picks.append(("model.layers.0.mlp.experts.5.down_proj", "model.layers.0.mlp.experts.w2", None, 77, 39))
    for prefix, param, row0, o, i in picks:
        want = _hand_value(t, prefix, o, i, SCHEMES[scheme]["bits"], v2)
        assert ref[prefix + ".weight"][o, i].item() == want, prefix
        have = got[param][5, o, i] if row0 is None else got[param][row0 + o, i]
        assert have == want, (prefix, o, i)


# ------------------------------------------------------------------ exact slices, report, logits


@pytest.mark.parametrize("scheme,lay", PARAMS)
def test_packed_tensors_scales_and_zero_points_are_exact_checkpoint_slices(ckpts, scheme, lay):
    c = ckpts.get(lay.model, scheme)
    for rank, got in enumerate(ckpts.run(scheme, lay)):
        assert got["raised"] is False, f"rank {rank}"
        state = got["state"]
        for name, want in expected(c["tensors"], c["facts"], c["quant"], lay, rank).items():
            have = state[name]
            assert isinstance(have, np.ndarray) and have.dtype == want.dtype, f"rank {rank}: {name} {have.dtype}"
            assert have.shape == want.shape and np.array_equal(have, want), f"rank {rank}: {name} differs"
        for param in matrices(c["facts"], lay, rank):  # no unquantized weight is left beside the stored tensors
            assert param not in state and f"{param}.weight" not in state, f"rank {rank}: {param}"


@pytest.mark.parametrize("scheme,lay", PARAMS)
def test_report_is_complete_and_names_the_scheme(ckpts, scheme, lay):
    out = ckpts.run(scheme, lay)
    for rank, got in enumerate(out):
        report = got["report"]
        assert report["complete"] is True and report["ok"] is True, f"rank {rank}"
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched", "nonfinite"):
            assert report[kind] == [], (rank, kind, report[kind])
        assert NOTES[scheme] in report["notes"], report["notes"]


@pytest.mark.parametrize("scheme,lay", PARAMS)
def test_logits_match_transformers_on_the_independently_dequantized_checkpoint(ckpts, scheme, lay):
    ref = ckpts.get(lay.model, scheme)["ref"]
    for rank, got in enumerate(ckpts.run(scheme, lay)):
        if coords(lay, rank)[2] != lay.pp - 1:
            continue
        logits = torch.from_numpy(got["logits"])
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        err = ((logits - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


# ------------------------------------------------------------------ refusals and deletions


@pytest.mark.parametrize("scheme, tensor", [("ct-int4-g64-asym", "model.layers.0.self_attn.o_proj.weight_scale"),
                                            ("gptq-int8-g64-v2", "model.layers.0.self_attn.o_proj.scales")])
def test_a_tp_that_would_split_a_group_is_refused_naming_the_tensor_and_the_degrees_that_work(ckpts, scheme,
                                                                                              tensor):
    with pytest.raises(PlanError) as err:
        dry_run(ckpts.get("llama", scheme)["q"], LoadConfig(tp=4), world_size=4)
    assert str(err.value).startswith("a TP shard of 32 columns cuts a quantization group of 64 (parameter "
                                     "model.layers.0.self_attn.o_proj.weight); tp that keep whole ones: 1, 2")
    assert err.value.tensor == tensor and err.value.file.endswith("config.json")


def test_integer_tensors_are_never_cast(ckpts, tmp_path):
    directory = copy_checkpoint(ckpts.get("llama", "gptq-int4-g32")["q"], str(tmp_path / "int64"))
    name = "model.layers.1.mlp.down_proj.g_idx"
    put_tensors(directory, {name: read_tensors(directory)[name].to(torch.int64)})
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=1)
    assert str(err.value).startswith("checkpoint dtype int64 differs from the model's int32 (parameter "
                                     "model.layers.1.mlp.down_proj.g_idx); integer parameters need the identical dtype")
    assert err.value.tensor == name


@pytest.mark.parametrize("scheme, model, lay, name, owners", [
    ("ct-int4-g64-asym", "llama", L("llama", 2, tp=2), "model.layers.1.mlp.down_proj.weight_scale", [0, 1]),
    ("gptq-int4-g32", "llama", L("llama", 4, tp=2, pp=2), "model.layers.1.self_attn.v_proj.qzeros", [2, 3]),
    ("gptq-int4-g64-desc", "llama", L("llama", 2, tp=2), "model.layers.0.self_attn.o_proj.g_idx", [0, 1]),
    ("gptq-int4-g32", "llama", L("llama", 2, tp=2), "model.layers.0.self_attn.k_proj.bias", [0, 1]),
    ("ct-int8-g32-asym", "qwen3_moe", L("qwen3_moe", 4, dp=4, ep=4),
     "model.layers.0.mlp.experts.5.up_proj.weight_zero_point", [2]),
])
def test_a_deleted_tensor_of_a_quantized_layer_is_missing_with_its_owners(ckpts, tmp_path, scheme, model, lay, name,
                                                                          owners):
    directory = copy_checkpoint(ckpts.get(model, scheme)["q"], str(tmp_path / "damaged"))
    delete_tensors(directory, [name])
    results = ckpts.pool.run(lay.world, quant_jobs.load_quantized, directory, lay.options())
    for r in results:
        assert r["raised"] and r["report"]["missing"] == [{"name": name, "owners": owners}]
        assert r["report"]["inconsistent"] == []


# ------------------------------------------------------------------ values the headers cannot show


def test_a_weight_shape_that_disagrees_with_the_packed_matrix_fails_the_load_naming_it(ckpts, tmp_path):
    directory = copy_checkpoint(ckpts.get("llama", "ct-int4-g32")["q"], str(tmp_path / "shape"))
    name = "model.layers.1.self_attn.k_proj.weight_shape"
    put_tensors(directory, {name: torch.tensor([64, 64])})
    (err,) = ckpts.pool.run(1, quant_jobs.load_error, directory, {})
    assert err == ("CheckpointError: weight_shape says [64, 64], but the packed weight is a [64, 128] matrix "
                   f"(parameter model.layers.1.self_attn.qkv_proj.weight) [tensor {name}, rank 0]")


def test_a_g_idx_out_of_column_order_without_desc_act_fails_the_load_naming_it(ckpts, tmp_path):
    directory = copy_checkpoint(ckpts.get("llama", "gptq-int4-g32")["q"], str(tmp_path / "g_idx"))
    name = "model.layers.0.mlp.gate_proj.g_idx"
    put_tensors(directory, {name: read_tensors(directory)[name].flip(0).contiguous()})
    errs = ckpts.pool.run(2, quant_jobs.load_error, directory, {"tp": 2})
    assert errs == [f"CheckpointError: g_idx is not in column order although desc_act is false (parameter "
                    f"model.layers.0.mlp.gate_up_proj.weight) [tensor {name}, rank {r}]" for r in range(2)]


# ------------------------------------------------------------------ config parsing and planning


@pytest.mark.parametrize("qc, text", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "quant_method gptq with bits 3 is not supported "
                                                              "(supported: 4, 8)"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "quant_method gptq group_size must be a positive "
                                                           "integer or -1, got 0"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not "
                                                                         "supported (supported: gptq, gptq_v2)"),
    ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "quant_method gptq with lm_head set is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 32}}}},
     "pack-quantized group g weights: 2-bit int is not supported (supported: 4-bit int, 8-bit int)"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "actorder": "group"}}}},
     "group g: actorder 'group' (a weight_g_idx per layer) is not supported (supported: none, weight)"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "dynamic": True}}}},
     "pack-quantized group g: input_activations are not supported (supported: weight-only schemes)"),
])
def test_int_configs_a_format_does_not_define_are_refused_naming_what_is_supported(qc, text):
    from distload import ConfigError
    from distload.quant import quant_config

    with pytest.raises(ConfigError) as err:
        quant_config({"quantization_config": qc})
    assert text in str(err.value)


def test_every_packed_tensor_scale_and_zero_point_is_owned_by_the_owners_of_its_weight(ckpts):
    """At 16 simulated ranks (tp 2, ep 8, expert tp 2: 32-row / 32-column expert shards, int8 words of 4):
    each tensor beside a weight is owned by exactly the ranks that own the weight's packed values, and
    an expert's tensors by the ranks hosting it."""
    from distload.prepare import prepare
    from distload.comm import Collectives
    from distload.layout import Layout
    from distload.models import reference_model

    directory = ckpts.get("qwen3_moe", "ct-int8-g32-asym")["q"]
    world, tp, ep = 16, 2, 8
    config = LoadConfig(tp=tp, ep=ep)
    *_, plan = prepare(directory, config, Layout.for_world(world, tp=tp, ep=ep), reference_model, rank=0,
                       ops=Collectives(None, tp), stage_ops=Collectives(None, world))
    owners: dict[str, set] = {}
    for i, u in enumerate(plan.units):
        owners.setdefault(u.name, set()).update(plan.owners(i))
    companions = [n for n in owners if n.endswith(("weight_scale", "weight_zero_point", "weight_shape"))]
    assert len(companions) == 3 * (2 * 4 + 3 + 8 * 3)  # 3 each: 2 x 4 attention, 3 dense MLP, 8 x 3 expert matrices
    for name in companions:
        assert owners[name] == owners[name.rpartition(".")[0] + ".weight_packed"], name
    # 8 experts over 8 groups of 2 ranks: expert 5 hosted by group 5 only (linear placement, no copies)
    assert owners["model.layers.0.mlp.experts.5.down_proj.weight_zero_point"] == {10, 11}
    assert dry_run(directory, config, world_size=world).complete
