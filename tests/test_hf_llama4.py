"""Llama 4 text checkpoints written by transformers (a MoE layer every second layer, its experts
packed into ``feed_forward.experts.gate_up_proj [E, H, 2I]`` with gate and up as the two halves,
``down_proj``, a shared expert; dense MLPs of ``intermediate_size_mlp`` between; NoPE layers with
temperature-tuned queries, chunked attention and L2 q/k norms in the rope layers) loaded at worlds
1, 2 and 4 (8: slow) over TP, TP x DP, EP (linear and round robin, redundant experts) and PP.

Expected by arithmetic written here, not by distload: each rank's parameters (its column block of
each expert's gate half and of its up half), bytes, units and files; the owners of a deleted
tensor. Logits and routing come from transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from distload.errors import PlanError
from tests import moe_jobs
from tests.hf_checkpoints import CheckpointCache, HFSpec, read_tensors, token_ids
from tests.moe_oracle import (L, assert_clean, assert_dry_run_matches, assert_only_inconsistent, assert_reads,
                              assert_routes_and_logits, block, common_state, coords, dense_ffn_state,
                              error_with_one_expert_fewer, headers, hf_reference, hosted, layers_of,
                              missing_after_deleting, packed_needs, packed_slot)

pytest.importorskip("transformers")

TOKENS = {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}
SPECS = {
    # 4 layers: experts in 1 and 3 (step 2), rope in 0, 1, 3 and none in 2 (interval 3); rope layers
    # attend in chunks of 4 and L2-normalize q / k; the NoPE layer's queries grow every 4 positions;
    # 6 experts (round-robin replicas land on other groups) of width 32, top 2; dense MLPs of 96
    "llama4": HFSpec(model_type="llama4_text", intermediate_size=32, num_hidden_layers=4, seed=41, extra={
        **TOKENS, "num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size_mlp": 96,
        "interleave_moe_layer_step": 2, "no_rope_layer_interval": 3, "attention_chunk_size": 4,
        "floor_scale": 4, "attn_scale": 0.1}),
    # Maverick-like: no q/k norm, llama3 rope, the MoE layers named (0 and 2), no temperature tuning
    "llama4_mav": HFSpec(model_type="llama4_text", intermediate_size=32, num_hidden_layers=4, seed=42, extra={
        **TOKENS, "num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size_mlp": 96,
        "moe_layers": [0, 2], "no_rope_layers": [1, 0, 1, 1], "attention_chunk_size": 4, "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
}
FF = "model.layers.{}.feed_forward."


@dataclass(frozen=True)
class Model:
    """The facts of a checkpoint's config a layout needs (read from the config.json transformers wrote)."""

    num_layers: int
    num_experts: int
    sparse: frozenset[int]

    @classmethod
    def of(cls, directory: str) -> "Model":
        with open(os.path.join(directory, "config.json")) as f:
            c = json.load(f)
        return cls(num_layers=c["num_hidden_layers"], num_experts=c["num_local_experts"],
                   sparse=frozenset(c["moe_layers"]))


LAYOUTS = [
    L("llama4", 1),
    L("llama4", 2, tp=2),                                          # ep 1: each expert's halves over the TP pair
    L("llama4", 2, dp=2, ep=2),                                    # 3 whole experts per rank
    L("llama4", 4, tp=2, dp=2, ep=2, redundant=2),                 # expert tp 2; experts 0, 1 on both groups
    L("llama4", 4, dp=4, ep=4, placement="round_robin", redundant=2),  # 8 slots, 2 per rank
    L("llama4", 4, tp=2, pp=2),                                    # layers 0, 1 | 2, 3
    L("llama4", 4, tp=4),                                          # KV heads on two ranks each; expert tp 4
    L("llama4_mav", 2, tp=2),
    L("llama4", 8, tp=2, dp=4, ep=4, placement="round_robin", redundant=2),
    L("llama4", 8, tp=2, dp=2, pp=2, ep=2),
]
PARAMS = [pytest.param(lay, id=lay.id, marks=[pytest.mark.slow] if lay.world == 8 else []) for lay in LAYOUTS]


class Checkpoints(CheckpointCache):
    """The checkpoints, transformers' outputs and each layout's load, made once per module."""

    def __init__(self, root, pool) -> None:
        super().__init__(root, SPECS)
        self.pool, self._runs, self._refs = pool, {}, {}

    def reference(self, name: str) -> tuple:
        if name not in self._refs:
            self._refs[name] = hf_reference(self.path(name), token_ids(SPECS[name]))
        return self._refs[name]

    def forward(self, lay: L) -> list[dict]:
        if lay not in self._runs:
            self._runs[lay] = self.pool.run(lay.world, moe_jobs.load_forward_route, self.path(lay.model),
                                            lay.options(), token_ids(SPECS[lay.model]), raise_errors=True)
        return self._runs[lay]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("hf-llama4"), pool)


def expected_state(ckpt: dict[str, torch.Tensor], m: Model, lay: L, rank: int) -> dict[str, torch.Tensor]:
    """The parameters ``rank`` must hold, sliced from the checkpoint by hand."""
    spec = SPECS["llama4"]
    tp, tp_i = lay.tp, coords(lay, rank)[0]
    out = common_state(ckpt, m, lay, rank, heads=spec.num_attention_heads, kv_heads=spec.num_key_value_heads,
                       head_dim=spec.head_dim)
    experts, shard, etp = hosted(m, lay, rank)
    for layer in layers_of(m, lay, rank):
        f = FF.format(layer)
        if layer not in m.sparse:
            out.update(dense_ffn_state(ckpt, f, tp, tp_i))
            continue
        out[f + "router.weight"] = ckpt[f + "router.weight"]
        gate_up, down = ckpt[f + "experts.gate_up_proj"], ckpt[f + "experts.down_proj"]
        out[f + "experts.gate_up_proj"] = torch.stack([packed_slot(gate_up, e, etp, shard, halves=True)
                                                       for e in experts])
        out[f + "experts.down_proj"] = torch.stack([block(down[e], 0, etp, shard) for e in experts])
        out.update(dense_ffn_state(ckpt, f + "shared_expert.", tp, tp_i))
    return out


def test_checkpoints_pack_experts_and_interleave_dense_layers(ckpts):
    for name in SPECS:
        directory = ckpts.path(name)
        m, ckpt = Model.of(directory), read_tensors(directory)
        assert m.sparse == ({1, 3} if name == "llama4" else {0, 2})
        for layer in range(m.num_layers):
            f = FF.format(layer)
            if layer in m.sparse:
                assert ckpt[f + "experts.gate_up_proj"].shape == (6, 64, 64)
                assert ckpt[f + "experts.down_proj"].shape == (6, 32, 64)
            else:
                assert ckpt[f + "gate_proj.weight"].shape == (96, 64)


@pytest.mark.parametrize("lay", PARAMS)
def test_params_are_their_regions_and_logits_match_transformers(ckpts, lay):
    directory = ckpts.path(lay.model)
    m, ckpt, hdr = Model.of(directory), read_tensors(directory), headers(directory)
    ref_logits, ref_routes = ckpts.reference(lay.model)
    # the input reaches every expert, so the logits depend on every slot's weights
    assert {e for experts, _ in ref_routes.values() for e in experts.flatten().tolist()} == set(range(m.num_experts))
    for rank, got in enumerate(ckpts.forward(lay)):
        assert_clean(got["report"], lay)
        want = expected_state(ckpt, m, lay, rank)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for name, w in want.items():
            assert torch.equal(torch.from_numpy(got["state"][name]), w), f"rank {rank}: {name} differs"
        need = packed_needs(m, lay, rank, hdr, kv_heads=SPECS[lay.model].num_key_value_heads, halves=True)
        assert_reads(got["report"], rank, need, hdr)
        assert_routes_and_logits(got, m, lay, rank, ref_logits, ref_routes)


def test_a_dry_run_plans_what_the_load_read(ckpts):
    lay = LAYOUTS[3]  # tp 2 x dp 2, ep 2, redundant copies
    assert_dry_run_matches(ckpts.path("llama4"), lay, ckpts.forward(lay)[0]["report"])


DELETED = [FF.format(1) + "experts.gate_up_proj", FF.format(1) + "router.weight",
           FF.format(3) + "shared_expert.down_proj.weight", FF.format(2) + "gate_proj.weight",
           "model.layers.0.self_attn.q_proj.weight"]
"""a whole packed expert tensor, a router, a shared expert's and a dense layer's matrix, a query projection"""


def test_each_deleted_tensor_is_missing_once_with_the_ranks_of_its_stage(ckpts):
    lay = L("llama4", 4, dp=2, pp=2, ep=2)  # stage 0: ranks 0, 1 (layers 0, 1); stage 1: ranks 2, 3
    report = missing_after_deleting(ckpts.pool, ckpts.copy("llama4"), DELETED, lay)
    for entry in report["missing"]:
        layer = int(entry["name"].split(".")[2])
        assert entry == {"name": entry["name"], "owners": [0, 1] if layer < 2 else [2, 3]}
    m, hdr = Model.of(ckpts.path("llama4")), headers(ckpts.path("llama4"))
    for rank, stats in enumerate(report["ranks"]):  # 3 hosted experts x 2 halves of gate_up, 1 unit of the others
        lost = sum(u for n, (_, u) in packed_needs(m, lay, rank, hdr, kv_heads=2, halves=True).items()
                   if n in DELETED)
        assert lost == (8 if rank < 2 else 2) and stats["units_not_loaded"] == lost, f"rank {rank}"


def test_rank_skipping_the_up_half_of_an_expert_copy_is_named_inconsistent(ckpts):
    # 8 slots linear over 2 groups of 2 ranks: expert 1 in slot 1 (ranks 0, 1) and slot 7 (ranks 2, 3);
    # rank 3 drops its column block of expert 1's up half, and loads its gate half
    lay = L("llama4", 4, tp=2, dp=2, ep=2, redundant=2)
    name = FF.format(1) + "experts.gate_up_proj"
    out = ckpts.pool.run(lay.world, moe_jobs.load_report, ckpts.path("llama4"),
                         {**lay.options(), "skip_units": {3: (name + "[1.up]",)}}, raise_errors=True)
    assert_only_inconsistent(out, name, [0, 1, 2, 3], [0, 1, 2])


def test_packed_tensor_one_expert_short_is_a_plan_error_naming_it(ckpts):
    name = FF.format(1) + "experts.down_proj"
    err = error_with_one_expert_fewer(ckpts.copy("llama4"), name)
    assert isinstance(err, PlanError) and err.tensor == name
    assert err.message == f"checkpoint shape [5, 32, 64] differs from the model's [6, 32, 64] (parameter {name})"
