"""Phi-3 checkpoints written by transformers (fused ``qkv_proj`` / ``gate_up_proj`` on disk) loaded at
worlds 1, 2 and 4: each rank's parameters equal their regions of the fused tensors, sliced here by
head / row arithmetic written for this test, and it read those bytes and no others; logits equal
transformers' Phi3ForCausalLM, with the default rope and with longrope on both sides of its
pretraining context (and in the ``rope_scaling`` form released Phi-3 configs use); a deleted fused
tensor, a rank skipping one region and a fused tensor of the wrong shape are named exactly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import distload
from distload.errors import PlanError
from tests import jobs
from tests.hf_checkpoints import CheckpointCache, HFSpec, delete_tensors, put_tensors, read_tensors, token_ids
from tests.moe_oracle import assert_reads, headers

pytest.importorskip("transformers")

TOKENS = {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}
SHORT, LONG = [1.0 + 0.1 * i for i in range(8)], [1.5 + 0.3 * i for i in range(8)]
"""longrope factors per frequency (head_dim 16)"""


def _longrope(seed: int, original: int, theta: float = 10000.0, **extra) -> HFSpec:
    """A longrope Phi-3 pretrained on ``original`` positions (max_position_embeddings is 64)."""
    return HFSpec(model_type="phi3", vocab_size=128, seed=seed, extra={
        **TOKENS, "original_max_position_embeddings": original, **extra,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": theta, "short_factor": SHORT, "long_factor": LONG}})


# transformers takes the long factors only for sequences longer than the pretraining context; the
# attention factor sqrt(1 + ln(64 / original) / ln original) either way. The test sequence has 10 tokens.
SPECS = {
    "phi3": HFSpec(model_type="phi3", vocab_size=128, seed=11, extra=dict(TOKENS)),
    "phi3_long": _longrope(12, 4, sliding_window=6),  # long factors; a sliding window of 6
    "phi3_short": _longrope(13, 10),  # exactly the pretraining context: short factors
    "phi3_released": _longrope(14, 9, theta=5000.0),  # one token past it: long factors
}
RELEASED = {"phi3_released"}
"""checkpoints whose config.json is rewritten into the form released Phi-3 configs have (transformers
4.x's ``rope_scaling`` with ``type``, ``rope_theta`` beside it), which transformers 5 still reads"""
TOLERANCE = 1e-5
"""max |distload - transformers| / max |transformers| for float32 logits"""
QKV, GATE_UP = "model.layers.{}.self_attn.qkv_proj.weight", "model.layers.{}.mlp.gate_up_proj.weight"


def released_form(directory: str) -> None:
    """Rewrites the config.json transformers 5 saved as a released Phi-3 config.json states its rope."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    config["rope_scaling"] = {"type": "longrope", "short_factor": params["short_factor"],
                              "long_factor": params["long_factor"]}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


class Phi3Checkpoints(CheckpointCache):
    """The checkpoints of SPECS, those in RELEASED with their config.json in the released form."""

    def path(self, name: str) -> str:
        written = name in self._dirs
        directory = super().path(name)
        if not written and name in RELEASED:
            released_form(directory)
        return directory


@pytest.fixture(scope="session")
def phi3_ckpts(tmp_path_factory) -> CheckpointCache:
    return Phi3Checkpoints(tmp_path_factory.mktemp("hf-phi3"), SPECS)


def test_the_released_form_states_longrope_under_rope_scaling(phi3_ckpts):
    with open(os.path.join(phi3_ckpts.path("phi3_released"), "config.json")) as f:
        config = json.load(f)
    assert "rope_parameters" not in config and config["rope_theta"] == 5000.0
    assert config["rope_scaling"] == {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}
    assert config["original_max_position_embeddings"] == 9 and config["max_position_embeddings"] == 64


def expected_params(ckpt: dict[str, torch.Tensor], spec: HFSpec, tp: int, tp_i: int,
                    layers: range) -> dict[str, torch.Tensor]:
    """What TP rank ``tp_i`` of ``tp`` holds: qkv = [its query heads' rows of the q block; the rows
    of the KV head(s) they read, from the k block and from the v block]; gate_up = [its row block
    of the gate half; the same of the up half]; o_proj / down_proj column blocks."""
    hd, heads, kv = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    inter = spec.intermediate_size
    mine = range(tp_i * heads // tp, (tp_i + 1) * heads // tp)
    my_kv = sorted({h // (heads // kv) for h in mine})

    def rows(t: torch.Tensor, first: int, which) -> torch.Tensor:
        return torch.cat([t[first + h * hd:first + (h + 1) * hd] for h in which])

    def block(t: torch.Tensor, dim: int, first: int = 0, size: int | None = None) -> torch.Tensor:
        n = (size if size is not None else t.shape[dim]) // tp
        return t.narrow(dim, first + tp_i * n, n)

    out = {}
    for i in layers:
        qkv, gu = ckpt[QKV.format(i)], ckpt[GATE_UP.format(i)]
        out[QKV.format(i)] = torch.cat([rows(qkv, 0, mine), rows(qkv, heads * hd, my_kv),
                                        rows(qkv, (heads + kv) * hd, my_kv)])
        out[GATE_UP.format(i)] = torch.cat([block(gu, 0, 0, inter), block(gu, 0, inter, inter)])
        p = f"model.layers.{i}."
        out[p + "self_attn.o_proj.weight"] = torch.cat(
            [ckpt[p + "self_attn.o_proj.weight"][:, h * hd:(h + 1) * hd] for h in mine], dim=1)
        out[p + "mlp.down_proj.weight"] = block(ckpt[p + "mlp.down_proj.weight"], 1)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + norm] = ckpt[p + norm]
    return out


def _vocab(t: torch.Tensor, tp: int, tp_i: int) -> torch.Tensor:
    n = t.shape[0] // tp
    return t[tp_i * n:(tp_i + 1) * n]


def _clean(report: dict) -> None:
    assert report["complete"] is True and report["ok"] is True, report
    for kind in ("missing", "inconsistent", "unexpected", "mismatched", "defaulted"):
        assert report[kind] == [], (kind, report[kind])


UNITS = {"qkv_proj.weight": 3, "gate_up_proj.weight": 2}
"""units a rank holds of a fused tensor: one per part (q, k, v; gate, up); one of any other tensor"""


def needs(want: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Checkpoint tensors a rank reads -> (its bytes of it, its units of it): the bytes of the
    slices it holds (float32; no slice is read twice, none padded)."""
    return {name: (t.numel() * t.element_size(), next((n for end, n in UNITS.items() if name.endswith(end)), 1))
            for name, t in want.items()}


# (checkpoint, world, tp, pp): tp=2 (one KV head per rank), tp=2 x dp=2, tp=4 (KV heads on two
# ranks each), pp=2 (one layer per stage), longrope at tp=2 and tp=4 (long factors), at tp=2 on
# the edge of the pretraining context (short factors) and one past it in the released form
LAYOUTS = [("phi3", 1, 1, 1), ("phi3", 2, 2, 1), ("phi3", 4, 2, 1), ("phi3", 4, 4, 1), ("phi3", 2, 1, 2),
           ("phi3_long", 2, 2, 1), ("phi3_long", 4, 4, 1), ("phi3_short", 2, 2, 1), ("phi3_released", 2, 2, 1)]


@pytest.mark.parametrize("name,world,tp,pp", LAYOUTS, ids=[f"{n}-w{w}-tp{t}-pp{p}" for n, w, t, p in LAYOUTS])
def test_params_are_their_regions_and_logits_match_transformers(pool, phi3_ckpts, name, world, tp, pp):
    spec = SPECS[name]
    directory = phi3_ckpts.path(name)
    results = pool.run(world, jobs.load_and_forward_pp, directory, tp, pp, token_ids(spec), raise_errors=True)
    ckpt, hdr = read_tensors(directory), headers(directory)
    reference = phi3_ckpts.reference_logits(name)
    per_stage = spec.num_hidden_layers // pp
    for rank, got in enumerate(results):
        _clean(got["report"])
        tp_i, stage = rank % tp, rank // (world // pp)
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        want = expected_params(ckpt, spec, tp, tp_i, layers)
        if stage == 0:
            want["model.embed_tokens.weight"] = _vocab(ckpt["model.embed_tokens.weight"], tp, tp_i)
        if stage == pp - 1:
            want["model.norm.weight"] = ckpt["model.norm.weight"]
            want["lm_head.weight"] = _vocab(ckpt["lm_head.weight"], tp, tp_i)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for pname, t in want.items():
            assert torch.equal(torch.from_numpy(got["state"][pname]), t), f"rank {rank}: {pname} differs"
        assert_reads(got["report"], rank, needs(want), hdr)
        if stage == pp - 1:
            logits = torch.from_numpy(got["logits"])
            err = ((logits - reference).abs().max() / reference.abs().max()).item()
            assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"


def _failed(results: list[dict]) -> dict:
    assert all(r["raised"] for r in results), [r["raised"] for r in results]
    for r in results[1:]:
        for kind in ("missing", "inconsistent", "unexpected", "complete"):
            assert r["report"][kind] == results[0]["report"][kind], kind
    return results[0]["report"]


def test_deleted_fused_qkv_is_missing_once_with_the_union_of_owners(pool, phi3_ckpts):
    directory = phi3_ckpts.copy("phi3")
    delete_tensors(directory, [QKV.format(1)])
    report = _failed(pool.run(4, jobs.load_outcome, directory, 2))
    # q, k and v regions, each split over tp=2: six units, one entry, every rank an owner
    assert report["missing"] == [{"name": QKV.format(1), "owners": [0, 1, 2, 3]}]
    assert report["inconsistent"] == [] and report["unexpected"] == []


def test_rank_skipping_its_k_region_is_inconsistent_and_named(pool, phi3_ckpts):
    skip = {3: (QKV.format(0) + "[k]",)}  # tp=4 over 2 KV heads: rank 3 shares KV head 1 with rank 2
    report = _failed(pool.run(4, jobs.load_outcome, phi3_ckpts.path("phi3"), 4, {"skip_units": skip}))
    assert report["missing"] == []
    assert report["inconsistent"] == [{"name": QKV.format(0), "owners": [0, 1, 2, 3], "loaded_by": [0, 1, 2]}]


def test_fused_tensor_of_the_wrong_shape_is_a_plan_error_naming_it(phi3_ckpts):
    directory = phi3_ckpts.copy("phi3")
    name = GATE_UP.format(0)
    put_tensors(directory, {name: read_tensors(directory)[name][:-1].clone()})  # one row of up too few
    with pytest.raises(PlanError) as err:
        distload.load(directory, distload.LoadConfig(device="cpu"))
    assert err.value.tensor == name
    assert err.value.message == (f"checkpoint shape [191, 64] differs from the model's [192, 64] "
                                 f"(parameter {name})")
