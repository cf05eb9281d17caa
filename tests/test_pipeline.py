"""Pipeline stages: each stage holds and reads only its layers; logits match transformers."""

from __future__ import annotations

import pytest
import torch

from tests import jobs
from tests.hf_checkpoints import delete_tensors, read_tensors
from tests.hf_checkpoints import CheckpointCache, token_ids
from tests.dense_slices import expected_params
from tests.devices import and_on_gpus
from tests.hf_checkpoints import DENSE_SPECS as SPECS
from tests.moe_oracle import TOLERANCE

# (checkpoint, world, tp, pp): dp = world / (tp x pp)
LAYOUTS = [("llama", 2, 1, 2), ("llama_tied", 4, 2, 2), ("qwen3", 8, 2, 2)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-pp"), SPECS)


def stage_layers(num_layers: int, pp: int, stage: int) -> list[int]:
    per = [num_layers // pp + (s < num_layers % pp) for s in range(pp)]
    start = sum(per[:stage])
    return list(range(start, start + per[stage]))


IDS = [f"{c}-w{w}-tp{t}-pp{p}" for c, w, t, p in LAYOUTS]


@pytest.mark.parametrize("name,world,tp,pp,ranks", and_on_gpus(LAYOUTS, lambda c, w, t, p: w, IDS), indirect=["ranks"])
def test_stages_hold_their_layers_exactly_and_logits_match(ranks, ckpts, name, world, tp, pp):
    spec = SPECS[name]
    directory = ckpts.path(name)
    ids = token_ids(spec)
    out = ranks.run(world, jobs.load_and_forward_pp, directory, tp, pp, ids, ranks.device)
    ckpt = read_tensors(directory)
    ref = ckpts.reference_logits(name)
    dp = world // (tp * pp)
    for rank, o in enumerate(out):
        assert o["report"]["complete"] is True
        stage, tp_i = rank // (tp * dp), rank % tp
        layers = stage_layers(spec.num_hidden_layers, pp, stage)
        want = {k: v for k, v in expected_params(ckpt, spec, tp, tp_i).items()
                if (k.startswith("model.layers.") and int(k.split(".")[2]) in layers)
                or (k == "model.embed_tokens.weight" and stage == 0)
                or (k in ("model.norm.weight", "lm_head.weight") and stage == pp - 1)}
        assert set(o["state"]) == set(want), rank
        for k, v in want.items():
            assert torch.equal(torch.from_numpy(o["state"][k]), v), (rank, k)
        if stage == pp - 1:
            got = torch.from_numpy(o["logits"])
            assert ((got - ref).abs().max() / ref.abs().max()).item() < TOLERANCE
        else:
            assert o["logits"] is None
        # a stage reads only its own tensors
        assert o["report"]["ranks"][rank]["units_owned"] < o["report"]["num_units"]


def test_missing_tensor_is_owned_by_its_stage_only(pool, ckpts):
    directory = ckpts.copy("llama_tied")
    delete_tensors(directory, ["model.layers.1.input_layernorm.weight", "model.embed_tokens.weight"])
    out = pool.run(8, jobs.load_outcome, directory, 2, {"pp": 2})
    report = out[0]["report"]
    assert report["complete"] is False
    by_name = {m["name"]: m for m in report["missing"]}
    # layer 1 lives on stage 1 (ranks 4-7 with tp=2, dp=2); every rank there owns the norm
    assert by_name["model.layers.1.input_layernorm.weight"]["owners"] == [4, 5, 6, 7]
    # the embedding: stage 0 holds it, and the tied LM head on stage 1 is filled from it
    assert by_name["model.embed_tokens.weight"]["owners"] == list(range(8))
