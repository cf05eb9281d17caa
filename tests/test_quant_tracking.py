"""Tracking of quantized models, gloo ranks on CPU: the cases that go silently wrong elsewhere.

A serving engine that exempts quantized layers from weight tracking loads an FP8 model
without one bias and produces garbage. Here a quantized layer's bias, scales and input
scales are units like any other; KV-cache scales are optional with a default; online
FP8 tracks the bf16 sources of the weights and scales it derives. Checkpoints are written
by transformers, then converted by the test writers (block FP8) or by compressed-tensors.
"""

from __future__ import annotations

import pytest
import torch

from tests import quant_jobs
from tests.ct_checkpoints import dequantized_checkpoint, write_ct_checkpoint
from tests.fp8_checkpoints import write_block_fp8_checkpoint
from tests.hf_checkpoints import HFSpec, copy_checkpoint, delete_tensors, hf_logits, put_tensors, read_tensors, \
    write_hf_checkpoint
from tests.hf_checkpoints import MOE_SPECS as SPECS

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

LLAMA = HFSpec(model_type="llama", intermediate_size=128, extra={"attention_bias": True}, seed=3)
"""q/k/v and o have biases; every TP shard up to 4 holds whole 16 x 16 blocks"""
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 120], [8, 1, 77, 33, 12, 90, 4]])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-tracking")
    f32 = write_hf_checkpoint(str(root / "llama"), LLAMA)
    moe = write_hf_checkpoint(str(root / "moe"), SPECS["qwen3_moe"])
    return {"llama": f32, "llama_fp8": write_block_fp8_checkpoint(f32, str(root / "llama_fp8")),
            "moe_fp8": write_block_fp8_checkpoint(moe, str(root / "moe_fp8")),
            "ct_static_kv": write_ct_checkpoint(str(root / "ct"), HFSpec(model_type="llama"), strategy="tensor",
                                                static_input=True, kv_cache=True)}


def _damaged(ckpts, key, tmp_path, names) -> str:
    directory = copy_checkpoint(ckpts[key], str(tmp_path / key))
    delete_tensors(directory, names)
    return directory


def _names(entries) -> list[str]:
    return [e["name"] for e in entries]


def _same_report_everywhere(results) -> dict:
    assert not any(isinstance(r, Exception) for r in results), results
    reports = [r["report"] for r in results]
    for r in reports[1:]:
        assert {k: r[k] for k in ("missing", "inconsistent", "defaulted")} == \
               {k: reports[0][k] for k in ("missing", "inconsistent", "defaulted")}
    return results[0]


# --------------------------------------------------------------- serialized FP8: missing pieces


def test_a_missing_bias_of_a_quantized_linear_is_reported_missing_by_name(pool, ckpts, tmp_path):
    bias = "model.layers.1.self_attn.k_proj.bias"
    directory = _damaged(ckpts, "llama_fp8", tmp_path, [bias])
    r = _same_report_everywhere(pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2}))
    assert r["raised"]
    assert r["report"]["missing"] == [{"name": bias, "owners": [0, 1]}]


def test_a_missing_weight_scale_inv_is_reported_missing(pool, ckpts, tmp_path):
    scale = "model.layers.0.mlp.down_proj.weight_scale_inv"
    directory = _damaged(ckpts, "llama_fp8", tmp_path, [scale])
    r = _same_report_everywhere(pool.run(4, quant_jobs.load_quantized, directory, {"tp": 2, "pp": 2}))
    assert r["raised"]
    assert r["report"]["missing"] == [{"name": scale, "owners": [0, 1]}]  # layer 0 lives on stage 0


def test_a_static_activation_checkpoint_without_one_input_scale_is_missing_it(pool, ckpts, tmp_path):
    name = "model.layers.1.self_attn.v_proj.input_scale"
    directory = _damaged(ckpts, "ct_static_kv", tmp_path, [name])
    r = _same_report_everywhere(pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2}))
    assert r["raised"] and _names(r["report"]["missing"]) == [name]
    assert r["report"]["missing"][0]["owners"] == [0, 1]


def test_a_non_local_experts_scale_is_reported_only_with_its_host(pool, ckpts, tmp_path):
    name = "model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"
    directory = _damaged(ckpts, "moe_fp8", tmp_path, [name])
    results = pool.run(4, quant_jobs.load_quantized, directory, {"dp": 4, "ep": 4})
    r = _same_report_everywhere(results)
    # 8 experts over 4 groups, linear placement: experts 4 and 5 live on rank 2 only
    assert r["raised"] and r["report"]["missing"] == [{"name": name, "owners": [2]}]
    owned = [s["units_owned"] for s in r["report"]["ranks"]]
    assert owned[2] == owned[0], "every rank owns as many units: its experts' and the dense ones"


# ------------------------------------------------------------------------------ KV-cache scales


def test_fp8_kv_cache_without_scales_loads_and_reports_them_defaulted(pool, ckpts, tmp_path):
    names = [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in ("k", "v")]
    directory = _damaged(ckpts, "ct_static_kv", tmp_path, names)
    results = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2})
    r = _same_report_everywhere(results)
    assert not r["raised"] and r["report"]["complete"]
    assert r["report"]["defaulted"] == [{"name": n, "owners": [0, 1]} for n in sorted(names)]
    for res in results:
        for n in names:
            assert res["state"][n].tolist() == [1.0]


def test_kv_scales_of_a_checkpoint_with_them_are_loaded(pool, ckpts):
    from tests.hf_checkpoints import read_tensors as read
    want = read(ckpts["ct_static_kv"])
    r = pool.run(2, quant_jobs.load_quantized, ckpts["ct_static_kv"], {"tp": 2})
    for res in r:
        assert not res["raised"] and res["report"]["defaulted"] == []
        for n in ("model.layers.0.self_attn.k_scale", "model.layers.1.self_attn.v_scale"):
            assert res["state"][n].tolist() == want[n].tolist()


def test_a_kv_scale_loaded_by_one_owner_only_is_inconsistent(pool, ckpts):
    name = "model.layers.0.self_attn.k_scale"
    r = _same_report_everywhere(pool.run(2, quant_jobs.load_quantized, ckpts["ct_static_kv"],
                                         {"tp": 2, "skip_units": {1: (name,)}}))
    assert r["raised"] and r["report"]["missing"] == []
    assert r["report"]["inconsistent"] == [{"name": name, "owners": [0, 1], "loaded_by": [0]}]


def test_an_unquantized_model_reports_no_kv_scales_at_all(pool, ckpts):
    results = pool.run(2, quant_jobs.load_quantized, ckpts["llama"], {"tp": 2})
    plain = _same_report_everywhere(results)["report"]
    assert plain["complete"] and plain["defaulted"] == [] and not any("kv cache" in n for n in plain["notes"])
    assert not any(k.endswith(("k_scale", "v_scale")) for k in results[0]["state"])
    fp8_kv = pool.run(2, quant_jobs.load_quantized, ckpts["llama"], {"tp": 2, "kv_cache_dtype": "fp8"})[0]["report"]
    assert fp8_kv["num_units"] == plain["num_units"] + 2 * 2  # k and v per layer, one unit each
    assert len(fp8_kv["defaulted"]) == 4


def test_legacy_kv_scale_fills_both_scales(pool, ckpts, tmp_path):
    directory = copy_checkpoint(ckpts["llama"], str(tmp_path / "legacy"))
    put_tensors(directory, {"model.layers.0.self_attn.kv_scale": torch.tensor([0.25]),
                            "model.layers.1.self_attn.kv_scale": torch.tensor([0.5])})
    results = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "kv_cache_dtype": "fp8"})
    r = _same_report_everywhere(results)
    assert r["report"]["complete"] and r["report"]["defaulted"] == [] and r["report"]["unexpected"] == []
    for res in results:
        assert res["state"]["model.layers.0.self_attn.k_scale"].tolist() == [0.25]
        assert res["state"]["model.layers.0.self_attn.v_scale"].tolist() == [0.25]
        assert res["state"]["model.layers.1.self_attn.v_scale"].tolist() == [0.5]
    # a layer without its kv_scale: k_scale defaulted, and v_scale (derived from it) named as affected
    delete_tensors(directory, ["model.layers.1.self_attn.kv_scale"])
    r = _same_report_everywhere(pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "kv_cache_dtype": "fp8"}))
    assert r["report"]["complete"] and r["report"]["defaulted"] == [
        {"name": "model.layers.1.self_attn.kv_scale", "owners": [0, 1],
         "affects": ["model.layers.1.self_attn.v_scale"]}]
    assert r["state"]["model.layers.1.self_attn.v_scale"].tolist() == [1.0]
    put_tensors(directory, {"model.layers.1.self_attn.kv_scale": torch.tensor([0.5])})
    # without the option the same checkpoint's kv_scale tensors are nobody's: unexpected
    plain = pool.run(1, quant_jobs.load_quantized, directory, {})[0]["report"]
    assert _names(plain["unexpected"]) == ["model.layers.0.self_attn.kv_scale", "model.layers.1.self_attn.kv_scale"]


# ------------------------------------------------------------------------------------ online FP8


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own per-row FP8: scale = amax / 448 (1 for an all-zero row)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _fp8(entry) -> torch.Tensor:
    tag, dtype, raw = entry
    assert tag == "fp8" and dtype == "torch.float8_e4m3fn"
    return torch.from_numpy(raw).view(torch.float8_e4m3fn)


def _rows(name: str, tp: int, tp_i: int, tensors, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rank ``tp_i``'s rows of a column-parallel checkpoint matrix (k / v over min(tp, kv heads))."""
    w = tensors[name]
    pieces = min(tp, kv_heads) if name.endswith(("k_proj.weight", "v_proj.weight")) else tp
    n = w.shape[0] // pieces
    i = tp_i * pieces // tp
    return w[i * n:(i + 1) * n]


@pytest.mark.parametrize("world, options", [(1, {}), (2, {"tp": 2}), (4, {"tp": 2, "pp": 2})])
def test_online_fp8_weights_and_scales_equal_the_tests_own_quantization(pool, ckpts, tmp_path, world, options):
    options = {**options, "quantize": "fp8", "dtype": "float32"}
    tensors = read_tensors(ckpts["llama"])
    results = pool.run(world, quant_jobs.load_quantized, ckpts["llama"], options, IDS)
    tp = options.get("tp", 1)
    for rank, res in enumerate(results):
        assert not res["raised"] and res["report"]["complete"], res["report"]
        assert "quantization: online fp8" in " ".join(res["report"]["notes"])
        state = res["state"]
        assert not any(k.endswith("_source") for k in state), "the bf16 copies are freed after quantizing"
        layers = sorted({k.split(".")[2] for k in state if k.startswith("model.layers.")})
        for layer in layers:
            p = f"model.layers.{layer}."
            fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
            for param, parts in fused.items():
                rows = torch.cat([_rows(p + part + ".weight", tp, rank % tp, tensors, 2, 16) for part in parts])
                q, scale = _quantize_rows(rows)
                assert torch.equal(_fp8(state[p + param + ".weight"]).view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(torch.from_numpy(state[p + param + ".weight_scale"]), scale)
            for param in ("self_attn.o_proj", "mlp.down_proj"):
                w = tensors[p + param + ".weight"]
                n = w.shape[1] // tp
                q, scale = _quantize_rows(w[:, (rank % tp) * n:(rank % tp + 1) * n])
                assert torch.equal(_fp8(state[p + param + ".weight"]).view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(torch.from_numpy(state[p + param + ".weight_scale"]), scale)


def test_online_fp8_logits_match_transformers_on_the_same_quantized_weights(pool, ckpts, tmp_path):
    """Per-channel FP8 of a column-split matrix is the same rows whatever the split; of a row-split
    one (o_proj, down_proj) it is per row of each rank's columns, so the reference is made at tp=1."""
    tensors = read_tensors(ckpts["llama"])
    reference = copy_checkpoint(ckpts["llama"], str(tmp_path / "ref"))
    put_tensors(reference, {n: (lambda q, s: q.float() * s)(*_quantize_rows(w)) for n, w in tensors.items()
                            if n.startswith("model.layers.") and n.endswith("proj.weight")})
    want = hf_logits(reference, IDS)
    original = hf_logits(ckpts["llama"], IDS)
    got = torch.from_numpy(pool.run(1, quant_jobs.load_quantized, ckpts["llama"],
                                    {"quantize": "fp8", "dtype": "float32"}, IDS)[0]["logits"])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    # against the unquantized model: FP8 rounding (3 mantissa bits) of every weight
    assert ((got - original).abs().max() / original.abs().max()).item() < 0.25


def test_online_fp8_with_a_missing_source_names_the_derived_parameters(pool, ckpts, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    directory = _damaged(ckpts, "llama", tmp_path, [name])
    r = _same_report_everywhere(pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "quantize": "fp8"}))
    assert r["raised"]
    assert r["report"]["missing"] == [{"name": name, "owners": [0, 1],
                                       "affects": ["model.layers.0.mlp.gate_up_proj.weight",
                                                   "model.layers.0.mlp.gate_up_proj.weight_scale"]}]


def test_online_fp8_of_moe_experts_tracks_each_experts_source(pool, tmp_path):
    directory = write_hf_checkpoint(str(tmp_path / "moe"), SPECS["qwen3_moe"])
    name = "model.layers.0.mlp.experts.6.gate_proj.weight"
    delete_tensors(directory, [name])
    r = _same_report_everywhere(pool.run(4, quant_jobs.load_quantized, directory,
                                         {"dp": 4, "ep": 4, "quantize": "fp8"}))
    assert r["raised"] and _names(r["report"]["missing"]) == [name]
    entry = r["report"]["missing"][0]
    assert entry["owners"] == [3]  # 8 experts over 4 groups: 6 and 7 on rank 3
    assert entry["affects"] == ["model.layers.0.mlp.experts.w13", "model.layers.0.mlp.experts.w13_weight_scale"]


def test_tracking_is_on_by_default_for_quantized_models_and_the_extra_config_turns_it_off(pool, ckpts, tmp_path):
    scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    directory = _damaged(ckpts, "llama_fp8", tmp_path, [scale])
    on = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2})[0]
    assert on["raised"] and on["report"]["tracked"] and _names(on["report"]["missing"]) == [scale]
    off = pool.run(2, quant_jobs.load_quantized, directory,
                   {"tp": 2, "extra_config": {"enable_weights_track": False}})[0]
    assert not off["raised"] and off["report"]["tracked"] is False and off["report"]["missing"] == []


def test_check_finite_scans_fp8_weights(pool, ckpts, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    directory = copy_checkpoint(ckpts["llama_fp8"], str(tmp_path / "nan"))
    w = read_tensors(directory)[name].clone()
    w.view(torch.uint8)[3, 5] = 0x7F  # a NaN in float8_e4m3fn
    put_tensors(directory, {name: w})
    r = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "check_finite": True})
    assert [e["name"] for e in r[0]["report"]["nonfinite"]] == [name]
    assert r[0]["report"]["nonfinite"][0]["found_on"] == [0]  # down_proj splits columns: column 5 is rank 0's


def test_scales_stored_in_bf16_load_without_a_cast_even_under_strict_dtype(pool, ckpts, tmp_path):
    """compressed-tensors writes a bf16 model's scales in bf16: the scale parameters take that dtype."""
    directory = copy_checkpoint(ckpts["ct_static_kv"], str(tmp_path / "bf16_scales"))
    tensors = read_tensors(directory)
    bf16 = {n: t.to(torch.bfloat16) for n, t in tensors.items()
            if n.endswith(("weight_scale", "input_scale", "k_scale", "v_scale"))}
    put_tensors(directory, bf16)
    r = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "strict_dtype": True, "dtype": "float32"}, IDS)
    for res in r:
        assert not res["raised"] and res["report"]["complete"]
        assert not any(n.startswith("cast") for n in res["report"]["notes"])
        tag, dtype, values = res["state"]["model.layers.0.self_attn.qkv_proj.weight_scale"]
        assert (tag, dtype) == ("bf16", "torch.bfloat16")
        names = [f"model.layers.0.self_attn.{p}_proj.weight_scale" for p in "qkv"]
        assert values.tolist() == [bf16[n].float().item() for n in names]
        assert res["state"]["model.layers.1.self_attn.v_scale"][:2] == ("bf16", "torch.bfloat16")
    reference = hf_logits(dequantized_checkpoint(directory, str(tmp_path / "deq")), IDS)
    got = torch.from_numpy(r[0]["logits"])
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_a_rank_that_fails_after_the_merge_fails_every_rank(pool, ckpts):
    """Post-load work (online FP8) runs after the merge: a rank that fails there is published,
    and no other rank returns a model as if the job had loaded."""
    results = pool.run(2, quant_jobs.load_with_failing_post_load, ckpts["llama"], {"tp": 2, "quantize": "fp8"}, 1)
    assert results[1] == "MemoryError: simulated: no memory for the FP8 copy"
    assert results[0].startswith("PeerFailedError: ") and "rank 1" in results[0], results[0]


def test_per_tensor_scales_stored_as_scalars_load(pool, ckpts, tmp_path):
    """Some FP8 tools store per-tensor scales 0-d: they are read as one-element vectors."""
    directory = copy_checkpoint(ckpts["ct_static_kv"], str(tmp_path / "scalars"))
    tensors = read_tensors(directory)
    scalars = {n: t.reshape(()) for n, t in tensors.items() if n.endswith(("weight_scale", "input_scale", "k_scale"))}
    put_tensors(directory, scalars)
    assert all(t.dim() == 0 for n, t in read_tensors(directory).items() if n in scalars)
    want = pool.run(2, quant_jobs.load_quantized, ckpts["ct_static_kv"], {"tp": 2, "dtype": "float32"}, IDS)
    got = pool.run(2, quant_jobs.load_quantized, directory, {"tp": 2, "dtype": "float32"}, IDS)
    for a, b in zip(want, got):
        assert b["report"]["complete"] and b["report"]["defaulted"] == []
        assert (a["logits"] == b["logits"]).all()
        assert b["state"]["model.layers.1.self_attn.qkv_proj.input_scale"].tolist() == \
            a["state"]["model.layers.1.self_attn.qkv_proj.input_scale"].tolist()


def test_online_fp8_of_experts_quantizes_every_slot_row_by_row(pool, tmp_path):
    directory = write_hf_checkpoint(str(tmp_path / "moe"), SPECS["qwen3_moe"])
    tensors = read_tensors(directory)
    results = pool.run(2, quant_jobs.load_quantized, directory, {"dp": 2, "ep": 2, "quantize": "fp8"})
    for rank, res in enumerate(results):
        assert res["report"]["complete"]
        state = res["state"]
        for layer in (0, 2):  # layer 1 is dense (mlp_only_layers)
            p = f"model.layers.{layer}.mlp.experts."
            for slot, expert in enumerate(range(4 * rank, 4 * rank + 4)):  # 8 experts, 4 per group, linear
                gate_up = torch.cat([tensors[f"{p}{expert}.{m}_proj.weight"] for m in ("gate", "up")])
                for attr, w in (("w13", gate_up), ("w2", tensors[f"{p}{expert}.down_proj.weight"])):
                    q, scale = _quantize_rows(w)
                    assert torch.equal(_fp8(state[p + attr])[slot].view(torch.uint8), q.view(torch.uint8))
                    assert torch.equal(torch.from_numpy(state[p + attr + "_weight_scale"][slot]), scale)


def test_routers_and_the_shared_expert_gate_stay_unquantized(pool, tmp_path):
    directory = write_hf_checkpoint(str(tmp_path / "qwen2_moe"), SPECS["qwen2_moe"])
    state = pool.run(1, quant_jobs.load_quantized, directory, {"quantize": "fp8"})[0]["state"]
    fp8 = {k for k, v in state.items() if isinstance(v, tuple) and v[0] == "fp8"}
    assert "model.layers.0.mlp.shared_expert.gate_up_proj.weight" in fp8 and "model.layers.0.mlp.experts.w13" in fp8
    for name in ("model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.mlp.gate.weight",
                 "model.embed_tokens.weight", "lm_head.weight"):
        assert name not in fp8 and str(state[name].dtype) == "float32", name
    assert "model.layers.0.mlp.shared_expert_gate.weight_scale" not in state


def test_online_fp8_sources_take_the_model_dtype_with_an_fp8_kv_cache(pool):
    """The bf16 example: read into bf16 sources (no cast) at the checkpoint's dtype, into float32
    ones (a cast, noted) at --dtype float32; the KV-cache scales never change either."""
    import distload

    example = distload.example_checkpoint()
    for dtype, cast in ((None, False), ("float32", True)):
        options = {"quantize": "fp8", "kv_cache_dtype": "fp8", **({"dtype": dtype} if dtype else {})}
        notes = pool.run(1, quant_jobs.load_quantized, example, options)[0]["report"]["notes"]
        assert any(n.startswith("cast bfloat16 -> float32") for n in notes) is cast, notes
