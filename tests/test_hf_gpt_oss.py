"""gpt-oss checkpoints written by transformers (every layer's experts packed into
``mlp.experts.gate_up_proj [E, H, 2I]`` with gate and up interleaved, ``down_proj``, their biases;
a router bias; attention sinks; sliding and full layers; yarn rope) loaded at worlds 1, 2 and 4
(8: slow) over TP, TP x DP, EP (linear and round robin, redundant experts) and PP.

Expected by arithmetic written here, not by distload: each rank's parameters (its heads' rows, its
experts' column block of the interleaved tensor), its bytes, units and files; the owners of a
deleted tensor; the byte runs an EP rank reads. Logits and routing come from transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distload import LoadConfig
from distload.prepare import prepare
from distload.comm import Collectives
from distload.errors import PlanError
from distload.layout import Layout
from distload.models import reference_model
from tests import moe_jobs
from tests.hf_checkpoints import CheckpointCache, HFSpec, read_tensors, token_ids
from tests.moe_oracle import (L, assert_clean, assert_dry_run_matches, assert_only_inconsistent, assert_reads,
                              assert_routes_and_logits, block, common_state, coords, error_with_one_expert_fewer,
                              headers, hf_reference, hosted, layers_of, missing_after_deleting, packed_needs,
                              packed_slot)

pytest.importorskip("transformers")

# 8 experts of width 32, top 2; a window of 4 in layer 0 (sliding), full attention in layer 1; yarn
# over 16 pretraining positions; a SwiGLU clamp of 1 that the test input reaches
SPEC = HFSpec(model_type="gpt_oss", intermediate_size=32, seed=31, extra={
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 4, "swiglu_limit": 1.0,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16}})
EXPERTS = "model.layers.{}.mlp.experts."


@dataclass(frozen=True)
class Model:
    """The facts of the test config a layout needs."""

    num_layers: int = SPEC.num_hidden_layers
    num_experts: int = SPEC.extra["num_local_experts"]
    sparse: frozenset[int] = frozenset(range(SPEC.num_hidden_layers))  # experts in every layer


M = Model()

LAYOUTS = [
    L("gpt_oss", 1),
    L("gpt_oss", 2, tp=2),                                     # ep 1: each expert's columns over the TP pair
    L("gpt_oss", 2, dp=2, ep=2, placement="round_robin"),      # whole experts, every other one per rank
    L("gpt_oss", 4, tp=2, dp=2, ep=2, redundant=2),            # expert tp 2; experts 0, 1 on both groups
    L("gpt_oss", 4, dp=4, ep=4, redundant=4),                  # 12 slots, 3 whole experts per rank
    L("gpt_oss", 4, tp=2, pp=2),                               # one layer per stage
    L("gpt_oss", 4, tp=4),                                     # KV heads on two ranks each; expert tp 4
    L("gpt_oss", 8, tp=2, dp=4, ep=4, placement="round_robin"),
    L("gpt_oss", 8, tp=2, dp=2, pp=2, ep=2, redundant=2),
]
PARAMS = [pytest.param(lay, id=lay.id, marks=[pytest.mark.slow] if lay.world == 8 else []) for lay in LAYOUTS]


class Checkpoints(CheckpointCache):
    """The checkpoint, transformers' outputs and each layout's load, made once per module."""

    def __init__(self, root, pool) -> None:
        super().__init__(root, {"gpt_oss": SPEC})
        self.pool, self._runs, self._ref = pool, {}, None

    def reference(self) -> tuple:
        if self._ref is None:
            self._ref = hf_reference(self.path("gpt_oss"), token_ids(SPEC))
        return self._ref

    def forward(self, lay: L) -> list[dict]:
        if lay not in self._runs:
            self._runs[lay] = self.pool.run(lay.world, moe_jobs.load_forward_route, self.path("gpt_oss"),
                                            lay.options(), token_ids(SPEC), raise_errors=True)
        return self._runs[lay]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("hf-gpt-oss"), pool)


def needs(lay: L, rank: int, hdr: dict) -> dict[str, tuple[int, int]]:
    """Checkpoint tensors ``rank`` reads -> (its bytes of it, its units of it)."""
    return packed_needs(M, lay, rank, hdr, kv_heads=SPEC.num_key_value_heads)


def expected_state(ckpt: dict[str, torch.Tensor], lay: L, rank: int) -> dict[str, torch.Tensor]:
    """The parameters ``rank`` must hold, sliced from the checkpoint by hand."""
    tp, tp_i = lay.tp, coords(lay, rank)[0]
    out = common_state(ckpt, M, lay, rank, heads=SPEC.num_attention_heads, kv_heads=SPEC.num_key_value_heads,
                       head_dim=SPEC.head_dim)
    experts, shard, etp = hosted(M, lay, rank)
    for layer in layers_of(M, lay, rank):
        p, x = f"model.layers.{layer}.", EXPERTS.format(layer)
        out[p + "self_attn.sinks"] = block(ckpt[p + "self_attn.sinks"], 0, tp, tp_i)
        for whole in ("mlp.router.weight", "mlp.router.bias"):
            out[p + whole] = ckpt[p + whole]
        for packed in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            t = ckpt[x + packed]
            out[x + packed] = torch.stack([t[e] if packed == "down_proj_bias" else
                                           block(t[e], 0, etp, shard) if packed == "down_proj" else
                                           packed_slot(t, e, etp, shard) for e in experts])
    return out


def test_checkpoint_packs_each_layers_experts_into_four_tensors(ckpts):
    hdr = headers(ckpts.path("gpt_oss"))
    ckpt = read_tensors(ckpts.path("gpt_oss"))
    e, h, i = M.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    for layer in range(M.num_layers):
        x = EXPERTS.format(layer)
        assert [tuple(ckpt[x + n].shape) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                   "down_proj_bias")] == [(e, h, 2 * i), (e, 2 * i), (e, i, h), (e, h)]
    assert not any(".experts.0." in n for n in hdr) and len({f for f, _, _ in hdr.values()}) > 2


@pytest.mark.parametrize("lay", PARAMS)
def test_params_are_their_regions_and_logits_match_transformers(ckpts, lay):
    directory = ckpts.path("gpt_oss")
    ckpt, hdr = read_tensors(directory), headers(directory)
    ref_logits, ref_routes = ckpts.reference()
    # the input reaches every expert, so the logits depend on every slot's weights
    assert {e for experts, _ in ref_routes.values() for e in experts.flatten().tolist()} == set(range(M.num_experts))
    for rank, got in enumerate(ckpts.forward(lay)):
        assert_clean(got["report"], lay)
        want = expected_state(ckpt, lay, rank)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for name, w in want.items():
            assert torch.equal(torch.from_numpy(got["state"][name]), w), f"rank {rank}: {name} differs"
        assert_reads(got["report"], rank, needs(lay, rank, hdr), hdr)
        assert_routes_and_logits(got, M, lay, rank, ref_logits, ref_routes)


def test_a_dry_run_plans_what_the_load_read(ckpts):
    lay = LAYOUTS[3]  # tp 2 x dp 2, ep 2, redundant copies
    assert_dry_run_matches(ckpts.path("gpt_oss"), lay, ckpts.forward(lay)[0]["report"])


DELETED = [EXPERTS.format(1) + "gate_up_proj", EXPERTS.format(0) + "down_proj_bias",
           "model.layers.0.self_attn.sinks", "model.layers.1.mlp.router.bias"]
"""a whole packed expert tensor, a packed experts' bias, the sinks, the router bias"""


def test_each_deleted_tensor_is_missing_once_with_the_ranks_of_its_stage(ckpts):
    lay = L("gpt_oss", 4, dp=2, pp=2, ep=2)  # stage 0: ranks 0, 1 (layer 0); stage 1: ranks 2, 3
    report = missing_after_deleting(ckpts.pool, ckpts.copy("gpt_oss"), DELETED, lay)
    for entry in report["missing"]:
        assert entry == {"name": entry["name"], "owners": [0, 1] if ".layers.0." in entry["name"] else [2, 3]}
    hdr = headers(ckpts.path("gpt_oss"))
    for rank, stats in enumerate(report["ranks"]):  # 4 hosted experts' units of a packed tensor, 1 of the others
        lost = sum(u for n, (_, u) in needs(lay, rank, hdr).items() if n in DELETED)
        assert lost == 5 and stats["units_not_loaded"] == lost, f"rank {rank}"


# (layout, rank -> skipped unit, name, owners, loaded_by)
SKIPPED = [
    # 10 slots linear over 2 groups of 2 ranks: expert 1 in slot 1 (ranks 0, 1) and slot 9 (ranks 2, 3);
    # rank 2 drops its column block of expert 1's region
    (L("gpt_oss", 4, tp=2, dp=2, ep=2, redundant=2), {2: (EXPERTS.format(0) + "gate_up_proj[1]",)},
     EXPERTS.format(0) + "gate_up_proj", [0, 1, 2, 3], [0, 1, 3]),
    # round robin: rank 1 alone hosts expert 3 and drops its down bias; rank 0 loaded its experts'
    (L("gpt_oss", 2, dp=2, ep=2, placement="round_robin"), {1: (EXPERTS.format(1) + "down_proj_bias[3]",)},
     EXPERTS.format(1) + "down_proj_bias", [0, 1], [0]),
]


@pytest.mark.parametrize("lay,skip,name,owners,loaded_by", SKIPPED, ids=[s[0].id for s in SKIPPED])
def test_rank_skipping_its_region_of_a_packed_tensor_is_named_inconsistent(ckpts, lay, skip, name, owners,
                                                                           loaded_by):
    out = ckpts.pool.run(lay.world, moe_jobs.load_report, ckpts.path("gpt_oss"), {**lay.options(), "skip_units": skip},
                         raise_errors=True)
    assert_only_inconsistent(out, name, owners, loaded_by)


def test_packed_tensor_one_expert_short_is_a_plan_error_naming_it(ckpts):
    name = EXPERTS.format(0) + "gate_up_proj"
    err = error_with_one_expert_fewer(ckpts.copy("gpt_oss"), name)
    assert isinstance(err, PlanError) and err.tensor == name
    assert err.message == f"checkpoint shape [7, 64, 64] differs from the model's [8, 64, 64] (parameter {name})"


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(runs):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


@pytest.mark.parametrize("lay", [L("gpt_oss", 4, tp=2, dp=2, ep=2, redundant=2), L("gpt_oss", 4, dp=4, ep=4,
                                                                                   redundant=4)], ids=lambda x: x.id)
def test_an_ep_rank_reads_exactly_its_experts_column_blocks(ckpts, lay):
    """The byte runs planned for a packed tensor are, by hand: per hosted expert, per row of it, the
    rank's column block (gate_up) or its row block (down, one run), and nothing of other experts."""
    directory = ckpts.path("gpt_oss")
    hdr = headers(directory)
    h, i = SPEC.hidden_size, SPEC.intermediate_size
    layout = Layout(world_size=lay.world, tp=lay.tp, dp=lay.dp, pp=lay.pp, ep=lay.ep)
    for rank in range(lay.world):
        *_, plan = prepare(directory, LoadConfig(device="cpu", **lay.options()), layout, reference_model, rank=rank,
                           ops=Collectives(None, lay.tp), stage_ops=Collectives(None, lay.tp * lay.dp))
        experts, shard, etp = hosted(M, lay, rank)
        begin = hdr[EXPERTS.format(0) + "gate_up_proj"][1]
        cols = 2 * i // etp
        first = [begin + 4 * ((x * h + r) * 2 * i + shard * cols) for x in experts for r in range(h)]
        want = _merged([(start, start + 4 * cols) for start in first])
        down = hdr[EXPERTS.format(0) + "down_proj"][1]
        rows = i // etp
        want_down = _merged([(down + 4 * (x * i + shard * rows) * h, down + 4 * (x * i + (shard + 1) * rows) * h)
                             for x in experts])
        got = {n: [] for n in ("gate_up_proj", "down_proj")}
        for read in plan.for_rank(rank).reads:
            for n in got:
                if read.tensor.name == EXPERTS.format(0) + n:
                    got[n] += [(read.offset + k * read.stride, read.offset + k * read.stride + read.run)
                               for k in range(read.count)]
        assert _merged(got["gate_up_proj"]) == want, f"rank {rank}"
        assert _merged(got["down_proj"]) == want_down, f"rank {rank}"
