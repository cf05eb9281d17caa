"""Multi-rank loads of checkpoints written by Hugging Face transformers (llama, qwen2, qwen3,
mistral) at world sizes 1, 2, 4 and 8.

Each (checkpoint, layout) is loaded once, in one job that returns every rank's
parameters, logits and report. Expected slices are computed from the checkpoint (read with
safetensors) by head / row / column arithmetic written for the tests (tests/dense_slices.py),
not by distload's planner; reference logits come from transformers itself.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import jobs
from tests.dense_slices import expected_params
from tests.devices import and_on_gpus
from tests.hf_checkpoints import DENSE_SPECS, CheckpointCache, delete_tensors, put_tensors, read_tensors, token_ids

pytest.importorskip("transformers")

SPECS = DENSE_SPECS

TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-dense"), SPECS)




def rank_of(tp_i: int, dp_i: int, tp: int, dp: int, pp_i: int = 0) -> int:
    return (pp_i * dp + dp_i) * tp + tp_i


def _clean(report: dict, world: int, tp: int) -> None:
    assert report["complete"] is True and report["ok"] is True, report
    assert report["mode"] == "load"
    assert report["layout"] == {"world_size": world, "tp": tp, "dp": world // tp, "pp": 1, "ep": 1}
    for kind in ("missing", "inconsistent", "unexpected", "mismatched", "defaulted"):
        assert report[kind] == [], (kind, report[kind])


# (checkpoint, world, tp): every world size; tp=1, tp dividing the 2 KV heads (tp=2),
# tp a multiple of them (tp=4, tp=8: KV heads replicated), and dp > 1
LAYOUTS = [
    ("llama", 1, 1), ("llama", 2, 2), ("llama", 4, 4), ("llama", 8, 4),
    ("llama_tied", 1, 1), ("llama_tied", 4, 4), ("llama_tied", 4, 2),
    ("qwen2", 2, 2), ("qwen2", 4, 4), ("qwen2", 8, 2),
    ("qwen3", 2, 1), ("qwen3", 4, 2), ("qwen3", 8, 8),
    ("mistral", 2, 2), ("mistral", 4, 4),
]


@pytest.mark.parametrize("name,world,tp,ranks", and_on_gpus(LAYOUTS, lambda n, w, t: w,
                                                            [f"{n}-w{w}-tp{t}" for n, w, t in LAYOUTS]),
                         indirect=["ranks"])
def test_params_exact_and_logits_match_transformers(ranks, ckpts, name, world, tp):
    spec = SPECS[name]
    directory = ckpts.path(name)
    results = ranks.run(world, jobs.load_and_forward, directory, tp, token_ids(spec), ranks.device,
                        raise_errors=True)
    checkpoint = read_tensors(directory)
    reference = ckpts.reference_logits(name)
    dp = world // tp
    for dp_i in range(dp):
        for tp_i in range(tp):
            rank = rank_of(tp_i, dp_i, tp, dp)
            got = results[rank]
            _clean(got["report"], world, tp)
            expected = expected_params(checkpoint, spec, tp, tp_i)
            assert sorted(got["state"]) == sorted(expected), f"rank {rank}"
            for pname, want in expected.items():
                assert got["dtypes"][pname] == "torch.float32", (rank, pname)
                have = torch.from_numpy(got["state"][pname])
                assert have.shape == want.shape and torch.equal(have, want), f"rank {rank}: {pname} differs"
            logits = torch.from_numpy(got["logits"])
            assert logits.shape == reference.shape, f"rank {rank}"
            err = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"
    assert results[0]["report"] == {**results[-1]["report"], "seconds": results[0]["report"]["seconds"]}


def _failed(results: list[dict]) -> dict:
    """Every rank raised MissingWeightsError with the same findings; returns rank 0's report."""
    assert all(r["raised"] for r in results), [r["raised"] for r in results]
    first = results[0]["report"]
    for r in results[1:]:
        for kind in ("missing", "inconsistent", "unexpected", "mismatched", "defaulted", "complete"):
            assert r["report"][kind] == first[kind], kind
    return first


# (checkpoint, deleted tensor, world, tp)
DELETED = [
    ("llama", "model.layers.1.post_attention_layernorm.weight", 1, 1),
    ("qwen3", "model.layers.0.self_attn.k_norm.weight", 2, 2),
    ("llama", "model.layers.0.self_attn.k_proj.weight", 4, 4),
    ("mistral", "model.layers.1.self_attn.q_proj.weight", 4, 2),
    ("qwen2", "model.layers.1.self_attn.v_proj.bias", 8, 4),
    ("qwen3", "model.layers.1.self_attn.k_proj.weight", 8, 8),
]


def test_deleted_embedding_is_not_owned_by_a_rank_with_only_padding_rows(pool, ckpts):
    directory = ckpts.copy("qwen3")
    delete_tensors(directory, ["model.embed_tokens.weight"])
    report = _failed(pool.run(8, jobs.load_outcome, directory, 8))
    # 33 rows in blocks of 5: TP rank 7 holds no checkpoint row, so it owns no piece
    assert report["missing"] == [{"name": "model.embed_tokens.weight", "owners": [0, 1, 2, 3, 4, 5, 6]}]
    assert report["inconsistent"] == [] and report["unexpected"] == []


@pytest.mark.parametrize("name,deleted,world,tp", DELETED,
                         ids=[f"{n}-{d.split('layers.')[-1]}-w{w}-tp{t}" for n, d, w, t in DELETED])
def test_deleted_tensor_is_missing_once_with_its_owners(pool, ckpts, name, deleted, world, tp):
    directory = ckpts.copy(name)
    delete_tensors(directory, [deleted])
    report = _failed(pool.run(world, jobs.load_outcome, directory, tp))
    # pp = 1: every rank needs some piece of every tensor (a replicated norm whole; q, k,
    # v, biases: a head block, KV blocks shared by the ranks of one KV head)
    owners = sorted(rank_of(t, d, tp, world // tp) for t in range(tp) for d in range(world // tp))
    assert report["complete"] is False and report["ok"] is False
    assert report["missing"] == [{"name": deleted, "owners": owners}]
    assert report["inconsistent"] == [] and report["unexpected"] == [] and report["mismatched"] == []


def test_deleted_embedding_of_tied_model_names_the_derived_head(pool, ckpts):
    directory = ckpts.copy("llama_tied")
    delete_tensors(directory, ["model.embed_tokens.weight"])
    report = _failed(pool.run(4, jobs.load_outcome, directory, 2))
    assert report["missing"] == [{"name": "model.embed_tokens.weight", "owners": [0, 1, 2, 3],
                                  "affects": ["lm_head.weight"]}]
    assert report["inconsistent"] == [] and report["unexpected"] == []


# (checkpoint, world, tp, rank -> skipped names, skipped name, loaded_by)
SKIPPED = [
    ("llama", 2, 2, {1: ("model.norm.weight",)}, "model.norm.weight", [0]),
    ("qwen2", 4, 2, {3: ("model.norm.weight",)}, "model.norm.weight", [0, 1, 2]),
    # tp=4, dp=2 over 2 KV heads: KV head 0 lives on ranks 0, 1 (replica 0) and 4, 5 (replica 1);
    # ranks 4 and 5 drop it, so only 0 and 1 hold it, and ranks 2, 3, 6, 7 hold KV head 1
    ("llama", 8, 4, {4: ("model.layers.1.self_attn.k_proj.weight",),
                     5: ("model.layers.1.self_attn.k_proj.weight",)},
     "model.layers.1.self_attn.k_proj.weight", [0, 1, 2, 3, 6, 7]),
    ("qwen3", 8, 8, {6: ("model.layers.0.input_layernorm.weight",)},
     "model.layers.0.input_layernorm.weight", [0, 1, 2, 3, 4, 5, 7]),
]


@pytest.mark.parametrize("name,world,tp,skip,skipped,loaded_by,ranks",
                         and_on_gpus(SKIPPED, lambda n, w, *_: w,
                                     [f"{n}-w{w}-tp{t}-{s.split('.')[-2]}" for n, w, t, _, s, _ in SKIPPED]),
                         indirect=["ranks"])
def test_rank_that_skips_a_unit_is_inconsistent(ranks, ckpts, name, world, tp, skip, skipped, loaded_by):
    report = _failed(ranks.run(world, jobs.load_outcome, ckpts.path(name), tp, {"skip_units": skip},
                               ranks.device))
    assert report["complete"] is False
    assert report["missing"] == []
    assert report["inconsistent"] == [{"name": skipped, "owners": list(range(world)), "loaded_by": loaded_by}]


def test_stray_tensor_is_unexpected_and_fails_under_strict(pool, ckpts):
    directory = ckpts.copy("qwen2")
    put_tensors(directory, {"model.layers.0.mlp.stray.weight": torch.ones(3),
                            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    results = pool.run(2, jobs.load_outcome, directory, 2)
    for r in results:
        assert r["raised"] is False
        assert r["report"]["complete"] is True and r["report"]["ok"] is True
        assert r["report"]["unexpected"] == [{"name": "model.layers.0.mlp.stray.weight"}]
        assert r["report"]["ignored"] == [{"name": "model.layers.0.self_attn.rotary_emb.inv_freq",
                                           "rule": r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$"}]
        assert r["report"]["missing"] == [] and r["report"]["inconsistent"] == []

    strict = pool.run(2, jobs.load_outcome, directory, 2, {"strict": True})
    report = _failed(strict)
    assert report["complete"] is True and report["ok"] is False
    assert report["unexpected"] == [{"name": "model.layers.0.mlp.stray.weight"}]
    assert "1 unexpected under --strict" in strict[0]["message"]


def test_tied_checkpoint_with_equal_lm_head_is_verified_and_consumed(pool, ckpts):
    base = ckpts.path("llama_tied")
    assert "lm_head.weight" not in read_tensors(base)  # transformers does not save a tied head
    directory = ckpts.copy("llama_tied")
    embedding = read_tensors(base)["model.embed_tokens.weight"]
    put_tensors(directory, {"lm_head.weight": embedding.clone()})
    plain = pool.run(4, jobs.load_outcome, base, 4)
    carried = pool.run(4, jobs.load_outcome, directory, 4)
    for before, after in zip(plain, carried):
        assert after["raised"] is False
        _clean(after["report"], 4, 4)
        # one verify unit per vocabulary block, read and counted by the rank that holds it
        assert after["report"]["num_units"] == before["report"]["num_units"] + 4
        for b, a in zip(before["report"]["ranks"], after["report"]["ranks"]):
            assert a["units_loaded"] == b["units_loaded"] + 1
            assert a["bytes_read"] > b["bytes_read"]


def test_tied_checkpoint_with_different_lm_head_is_mismatched(pool, ckpts):
    directory = ckpts.copy("llama_tied")
    head = read_tensors(directory)["model.embed_tokens.weight"].clone()
    head[129] += 1.0  # the last vocabulary row: in the last block at tp=4 (rows 99..129)
    put_tensors(directory, {"lm_head.weight": head})
    report = _failed(pool.run(8, jobs.load_outcome, directory, 4))
    assert report["complete"] is True and report["ok"] is False
    # the last block is held by TP rank 3 of each replica: ranks 3 and 7
    assert report["mismatched"] == [{"name": "lm_head.weight", "owners": list(range(8)),
                                     "against": "model.embed_tokens.weight", "differs_on": [3, 7]}]
    assert report["missing"] == [] and report["inconsistent"] == [] and report["unexpected"] == []


def test_report_json_has_the_public_keys(pool, ckpts):
    directory = ckpts.copy("llama")
    delete_tensors(directory, ["model.layers.0.input_layernorm.weight"])
    put_tensors(directory, {"stray": torch.zeros(2)})
    report = _failed(pool.run(2, jobs.load_outcome, directory, 2, {"skip_units": {1: ("model.norm.weight",)}}))
    for key in ("complete", "mode", "layout", "missing", "inconsistent", "unexpected", "defaulted", "ranks",
                "seconds"):
        assert key in report, key
    assert report["complete"] is False and report["mode"] == "load"
    assert report["layout"] == {"world_size": 2, "tp": 2, "dp": 1, "pp": 1, "ep": 1}
    assert report["missing"] == [{"name": "model.layers.0.input_layernorm.weight", "owners": [0, 1]}]
    assert report["inconsistent"] == [{"name": "model.norm.weight", "owners": [0, 1], "loaded_by": [0]}]
    assert report["unexpected"] == [{"name": "stray"}]
    assert report["defaulted"] == []
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        assert r["bytes_read"] > 0 and isinstance(r["seconds"], float) and r["seconds"] >= 0
    assert isinstance(report["seconds"], float) and report["seconds"] > 0
    assert os.path.samefile(report["checkpoint"], directory)


def test_keep_group_holds_the_process_group_until_close(pool, ckpts):
    directory = ckpts.path("llama")
    for outcome in pool.run(2, jobs.group_lifetime, directory, 2):
        assert outcome == {"during": True, "after_close": False, "raised": True, "after_failed_load": False}
