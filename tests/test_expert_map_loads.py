"""``--expert-map`` in a real multi-rank load of every mixture-of-experts type (mixtral, qwen2_moe,
qwen3_moe, deepseek_v3 with its ``n_routed_experts`` key, gpt_oss and llama4_text with packed
experts), checkpoints written by transformers.

Each map places the experts otherwise than any option would: a default layout of odd experts on
group 0 and even ones on group 1, each group with a redundant copy of an expert of the other, and
one layer reversed. Expected by hand: which expert each rank's slots hold (from the map), so each
slot's down projection equals that expert's shard of the checkpoint; the logits are transformers'.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from tests import moe_jobs
from tests.hf_checkpoints import CheckpointCache, HFSpec, read_tensors, token_ids
from tests.moe_oracle import TOLERANCE, L, block, hosted

pytest.importorskip("transformers")

TOKENS = {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Case:
    """One MoE type: its checkpoint, its sparse layers, and where expert ``e``'s down projection lies."""

    spec: HFSpec
    num_experts: int
    sparse: tuple[int, ...]
    down: str
    """checkpoint name of layer ``{layer}``'s expert ``{expert}`` down projection, or of the packed tensor"""
    param: str
    """the stacked parameter holding this rank's slots of it"""

    @property
    def packed(self) -> bool:
        return "{expert}" not in self.down


PER_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"
CASES = {
    "mixtral": Case(spec=HFSpec(model_type="mixtral", intermediate_size=32, seed=51,
                                extra={"num_local_experts": 8, "num_experts_per_tok": 2}),
                    num_experts=8, sparse=(0, 1),
                    down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
                    param="model.layers.{layer}.block_sparse_moe.experts.w2"),
    "qwen2_moe": Case(spec=HFSpec(model_type="qwen2_moe", seed=52, extra={
        "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48}), num_experts=6, sparse=(0, 1), down=PER_EXPERT,
        param="model.layers.{layer}.mlp.experts.w2"),
    "qwen3_moe": Case(spec=HFSpec(model_type="qwen3_moe", num_hidden_layers=3, seed=53, extra={
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]}),
        num_experts=8, sparse=(0, 2), down=PER_EXPERT, param="model.layers.{layer}.mlp.experts.w2"),
    "deepseek_v3": Case(spec=HFSpec(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, seed=54, extra={
        "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 8,
        "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8}),
        num_experts=8, sparse=(1, 2), down=PER_EXPERT, param="model.layers.{layer}.mlp.experts.w2"),
    "gpt_oss": Case(spec=HFSpec(model_type="gpt_oss", intermediate_size=32, seed=55, extra={
        **TOKENS, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 4}),
        num_experts=8, sparse=(0, 1), down="model.layers.{layer}.mlp.experts.down_proj",
        param="model.layers.{layer}.mlp.experts.down_proj"),
    "llama4_text": Case(spec=HFSpec(model_type="llama4_text", intermediate_size=32, seed=56, extra={
        **TOKENS, "num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size_mlp": 96,
        "attention_chunk_size": 4}),
        num_experts=6, sparse=(0, 1), down="model.layers.{layer}.feed_forward.experts.down_proj",
        param="model.layers.{layer}.feed_forward.experts.down_proj"),
}
LAYOUT = L("any", 4, tp=2, dp=2, ep=2)
"""two expert groups of two ranks (expert tp 2); the slots are placed linearly"""


def map_slots(num_experts: int) -> dict[str, list[int]]:
    """slot -> expert of the default entry and of the reversed layer (by hand)."""
    odd, even = list(range(1, num_experts, 2)), list(range(0, num_experts, 2))
    return {"default": odd + [0] + even + [1], "reversed": list(range(num_experts))[::-1]}


def expert_map(case: Case) -> dict:
    """The map document: the default entry, and the last sparse layer reversed."""
    slots = map_slots(case.num_experts)

    def entry(order: list[int]) -> dict[str, list[int]]:
        return {str(e): [s for s, x in enumerate(order) if x == e] for e in range(case.num_experts)}

    return {"layers": {"default": entry(slots["default"]), str(case.sparse[-1]): entry(slots["reversed"])}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("hf-expert-map"), {name: c.spec for name, c in CASES.items()})


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_expert_map_places_every_slot_in_a_multi_rank_load(pool, ckpts, tmp_path, name):
    case = CASES[name]
    directory = ckpts.path(name)
    path = os.path.join(tmp_path, "map.json")
    with open(path, "w") as f:
        json.dump(expert_map(case), f)
    ids = token_ids(case.spec)
    options = {**LAYOUT.options(), "expert_map": path}
    out = pool.run(LAYOUT.world, moe_jobs.load_forward_route, directory, options, ids, raise_errors=True)
    ckpt, ref = read_tensors(directory), ckpts.reference_logits(name)
    for rank, got in enumerate(out):
        report = got["report"]
        assert report["complete"] is True and report["ok"] is True and report["missing"] == []
        for layer in case.sparse:
            order = map_slots(case.num_experts)["reversed" if layer == case.sparse[-1] else "default"]
            experts, shard, etp = hosted(case, LAYOUT, rank, slots=order)
            have = torch.from_numpy(got["state"][case.param.format(layer=layer)])
            assert have.shape[0] == len(experts), f"rank {rank}: layer {layer}"
            for slot, e in enumerate(experts):
                if case.packed:  # [E, I, H]: the shard's rows of expert e
                    want = block(ckpt[case.down.format(layer=layer)][e], 0, etp, shard)
                else:  # [H, I] per expert: the shard's columns
                    want = block(ckpt[case.down.format(layer=layer, expert=e)], 1, etp, shard)
                assert torch.equal(have[slot], want), f"rank {rank}: layer {layer} slot {slot} is not expert {e}"
        err = ((torch.from_numpy(got["logits"]) - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"
