"""A DeepSeek-V3 checkpoint written by Hugging Face transformers (multi-head latent attention
with low-rank q and kv, a dense first layer, grouped sigmoid routing with a float32
``e_score_correction_bias``, a shared expert) loaded at world sizes 1, 2, 4 and 8 over tensor,
data, pipeline and expert parallel layouts, linear and round-robin expert placement.

Everything expected is computed here, by arithmetic written for this test, not by distload:
which decoder layers each pipeline stage holds (the first stage also the embedding, the last
the final norm and lm_head), which rows / columns of each MLA projection a TP rank holds (by
heads), which experts each rank hosts, which checkpoint tensors (and how many bytes of each)
every rank needs, the owners of a deleted tensor (the ranks of the stage holding it). Reference
logits and routing decisions come from transformers itself; the correction bias is drawn at
random, so it changes which groups and experts are chosen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from tests import moe_jobs
from tests.devices import and_on_gpus
from tests.hf_checkpoints import DEEPSEEK_V3, copy_checkpoint, delete_tensors, put_tensors, read_tensors, write_hf_checkpoint
from tests.moe_oracle import deepseek_input_ids as input_ids
from tests.moe_oracle import (TOLERANCE, L, assert_routes_and_logits, by_expert, coords, headers, hf_reference, hosted,
                              stage_of_layer)

pytest.importorskip("transformers")

SPEC = DEEPSEEK_V3

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
MTP = "model.layers.3.eh_proj.weight"  # num_hidden_layers = 3: the multi-token-prediction layer

LAYOUTS = [
    L("deepseek_v3", 1),
    L("deepseek_v3", 2, tp=2),                                   # ep 1: each expert split over the TP pair
    L("deepseek_v3", 4, tp=2, dp=2, ep=2),                       # 4 whole experts per TP pair, expert tp 2
    L("deepseek_v3", 4, dp=4, ep=4, placement="round_robin"),    # ep = world: experts g and g + 4 on rank g
    L("deepseek_v3", 4, dp=2, pp=2, ep=2),                       # stages: layers 0 (dense), 1 | 2; 4 experts per rank
    L("deepseek_v3", 8, tp=2, dp=4, ep=4),                       # 2 experts per group of 2 ranks
    L("deepseek_v3", 8, tp=2, dp=2, pp=2, ep=2),                 # stages of 4 ranks, 4 experts per TP pair
]
PARAMS = [pytest.param(lay, id=lay.id, marks=[pytest.mark.slow] if lay.world == 8 else []) for lay in LAYOUTS]
ON_DEVICES = and_on_gpus(PARAMS, lambda lay: lay.world)


@dataclass(frozen=True)
class Model:
    """The facts of the DeepSeek-V3 config a layout needs."""

    num_layers: int
    num_experts: int
    heads: int
    qk_dim: int  # qk_nope_head_dim + qk_rope_head_dim: rows of q_b_proj per head
    kv_dim: int  # qk_nope_head_dim + v_head_dim: rows of kv_b_proj per head
    v_dim: int  # columns of o_proj per head
    sparse: frozenset[int]

    @classmethod
    def of(cls, directory: str) -> "Model":
        with open(os.path.join(directory, "config.json")) as f:
            c = json.load(f)
        layers = c["num_hidden_layers"]
        return cls(num_layers=layers, num_experts=c["n_routed_experts"], heads=c["num_attention_heads"],
                   qk_dim=c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
                   kv_dim=c["qk_nope_head_dim"] + c["v_head_dim"], v_dim=c["v_head_dim"],
                   sparse=frozenset(range(c["first_k_dense_replace"], layers)))


def needs(m: Model, lay: L, rank: int, names) -> dict[str, int]:
    """Checkpoint tensors ``rank`` needs a piece of -> into how many pieces that tensor is cut.
    q_b_proj / kv_b_proj / o_proj, dense and shared MLPs, embeddings and head split over tp;
    experts over the expert tp; the low-rank projections, norms, router and bias whole.
    Only the layers of the rank's stage; the embedding on the first stage, the final norm and
    lm_head on the last. Nothing of the MTP layer (``model.layers.{num_layers}``)."""
    _, _, pp_i = coords(lay, rank)
    experts, _, etp = hosted(m, lay, rank)
    out = {}
    for name in names:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer >= m.num_layers or stage_of_layer(m, lay, layer) != pp_i:
                continue
            if ".mlp.experts." in name:
                if int(name.split(".experts.")[1].split(".")[0]) in experts:
                    out[name] = etp
            elif any(k in name for k in ("q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
                out[name] = lay.tp  # incl. the dense layer's MLP and the shared expert
            else:
                out[name] = 1  # q_a_proj, kv_a_proj_with_mqa, every norm, router weight and bias
        elif name == "model.embed_tokens.weight" and pp_i == 0:
            out[name] = lay.tp
        elif name == "lm_head.weight" and pp_i == lay.pp - 1:
            out[name] = lay.tp
        elif name == "model.norm.weight" and pp_i == lay.pp - 1:
            out[name] = 1
    return out


def owners_of(m: Model, lay: L, name: str) -> list[int]:
    """Ranks that need a piece of ``name``."""
    return [r for r in range(lay.world) if name in needs(m, lay, r, [name])]


def expected_state(ckpt: dict[str, torch.Tensor], m: Model, lay: L, rank: int) -> dict[str, torch.Tensor]:
    """The parameters ``rank`` must hold, sliced from the checkpoint by hand."""
    tp = lay.tp
    tp_i, _, pp_i = coords(lay, rank)
    my_heads = range(tp_i * m.heads // tp, (tp_i + 1) * m.heads // tp)

    def heads(t, size, dim=0):
        return torch.cat([t.narrow(dim, h * size, size) for h in my_heads], dim=dim)

    def block(t, dim, n=tp, i=tp_i):
        size = t.shape[dim] // n
        return t.narrow(dim, i * size, size)

    out = {}
    if pp_i == 0:
        out["model.embed_tokens.weight"] = block(ckpt["model.embed_tokens.weight"], 0)
    if pp_i == lay.pp - 1:
        out["model.norm.weight"] = ckpt["model.norm.weight"]
        out["lm_head.weight"] = block(ckpt["lm_head.weight"], 0)
    for layer in range(m.num_layers):
        if stage_of_layer(m, lay, layer) != pp_i:
            continue
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        for whole in (a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "kv_a_proj_with_mqa.weight",
                      a + "kv_a_layernorm.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"):
            out[whole] = ckpt[whole]
        out[a + "q_b_proj.weight"] = heads(ckpt[a + "q_b_proj.weight"], m.qk_dim)
        out[a + "kv_b_proj.weight"] = heads(ckpt[a + "kv_b_proj.weight"], m.kv_dim)
        out[a + "o_proj.weight"] = heads(ckpt[a + "o_proj.weight"], m.v_dim, dim=1)
        b = p + "mlp."
        if layer not in m.sparse:
            out[b + "gate_up_proj.weight"] = torch.cat([block(ckpt[b + "gate_proj.weight"], 0),
                                                        block(ckpt[b + "up_proj.weight"], 0)])
            out[b + "down_proj.weight"] = block(ckpt[b + "down_proj.weight"], 1)
            continue
        out[b + "gate.weight"] = ckpt[b + "gate.weight"]
        out[b + "gate.e_score_correction_bias"] = ckpt[b + "gate.e_score_correction_bias"]
        experts, shard, etp = hosted(m, lay, rank)
        w13, w2 = [], []
        for e in experts:
            gate, up, down = (ckpt[b + f"experts.{e}.{k}_proj.weight"] for k in ("gate", "up", "down"))
            w13.append(torch.cat([block(gate, 0, etp, shard), block(up, 0, etp, shard)]))
            w2.append(block(down, 1, etp, shard))
        out[b + "experts.w13"], out[b + "experts.w2"] = torch.stack(w13), torch.stack(w2)
        s = b + "shared_experts."
        out[s + "gate_up_proj.weight"] = torch.cat([block(ckpt[s + "gate_proj.weight"], 0),
                                                    block(ckpt[s + "up_proj.weight"], 0)])
        out[s + "down_proj.weight"] = block(ckpt[s + "down_proj.weight"], 1)
    return out


# ---------------------------------------------------------------- transformers' side


class Checkpoints:
    """The checkpoint, transformers' outputs and load results, each made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self.path = write_hf_checkpoint(str(root / "deepseek_v3"), SPEC, max_shard_size="20KB")
        self._ref = None
        self._runs: dict[L, list] = {}

    def reference(self) -> tuple:
        if self._ref is None:
            self._ref = hf_reference(self.path, input_ids())
        return self._ref

    def forward(self, lay: L, ranks) -> list[dict]:
        if (lay, ranks.device) not in self._runs:
            self._runs[lay, ranks.device] = ranks.run(lay.world, moe_jobs.load_forward_route, self.path,
                                                      lay.options(), input_ids(), ranks.device, raise_errors=True)
        return self._runs[lay, ranks.device]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("hf-deepseek"), pool)


def test_checkpoint_holds_mla_router_bias_and_per_expert_tensors_in_several_shards(ckpts):
    hdr = headers(ckpts.path)
    m = Model.of(ckpts.path)
    assert len({f for f, _, _ in hdr.values()}) > 2
    assert m.sparse == {1, 2} and m.num_experts == 8
    ckpt = read_tensors(ckpts.path)
    for layer in m.sparse:
        bias = ckpt[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().min() > 0  # re-drawn, not transformers' zeros
        assert ckpt[f"model.layers.{layer}.mlp.gate.weight"].dtype == torch.float32
        for e in range(m.num_experts):
            assert f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight" in ckpt
    assert "model.layers.0.self_attn.q_b_proj.weight" in ckpt and "model.layers.0.mlp.gate.weight" not in ckpt


# ---------------------------------------------------------------- 1. exact parameters, logits, routing


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_params_exact_logits_and_routing_match_transformers(ckpts, lay, ranks):
    m = Model.of(ckpts.path)
    ckpt = read_tensors(ckpts.path)
    hdr = headers(ckpts.path)
    ref_logits, ref_routes = ckpts.reference()
    assert sorted(ref_routes) == sorted(m.sparse)
    # the input reaches every expert in some layer, so the logits depend on every slot's weights
    assert {e for experts, _ in ref_routes.values() for e in experts.flatten().tolist()} == set(range(m.num_experts))
    out = ckpts.forward(lay, ranks)
    for rank, got in enumerate(out):
        report = got["report"]
        assert report["complete"] is True and report["ok"] is True
        assert report["layout"] == {"world_size": lay.world, "tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep}
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched", "ignored"):
            assert report[kind] == [], (kind, report[kind])
        assert report == {**out[0]["report"], "seconds": report["seconds"]}

        want = expected_state(ckpt, m, lay, rank)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for pname, w in want.items():
            have = torch.from_numpy(got["state"][pname])
            assert have.dtype == w.dtype == torch.float32, pname
            assert have.shape == w.shape and torch.equal(have, w), f"rank {rank}: {pname} differs"

        need = needs(m, lay, rank, hdr)
        stats = report["ranks"][rank]
        assert stats["units_owned"] == stats["units_loaded"] == len(need), f"rank {rank}"
        assert stats["units_not_loaded"] == 0
        assert stats["bytes_read"] == sum((hdr[n][2] - hdr[n][1]) // k for n, k in need.items()), f"rank {rank}"
        assert stats["files_opened"] == len({hdr[n][0] for n in need}), f"rank {rank}"

        assert_routes_and_logits(got, m, lay, rank, ref_logits, ref_routes)


def test_correction_bias_changes_the_routing(ckpts):
    """Without the bias transformers would pick other experts: the test above sees it used."""
    from transformers import AutoModelForCausalLM

    _, routes = ckpts.reference()
    model = AutoModelForCausalLM.from_pretrained(ckpts.path, dtype=torch.float32, attn_implementation="eager")
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
    unbiased = {}
    router.register_forward_hook(lambda _m, _a, out: unbiased.__setitem__(1, out[2].clone()))
    with torch.no_grad():
        model(input_ids())
    assert not torch.equal(by_expert(unbiased[1], unbiased[1])[0], by_expert(*routes[1])[0])


# ---------------------------------------------------------------- 2. missing bias, ignored MTP


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_deleted_correction_bias_is_missing_with_every_rank_of_the_stage(ckpts, tmp_path, lay, ranks):
    directory = copy_checkpoint(ckpts.path, str(tmp_path / "no-bias"))
    delete_tensors(directory, [BIAS])
    out = ranks.run(lay.world, moe_jobs.load_report, directory, lay.options(), ranks.device, raise_errors=True)
    assert all(o["raised"] for o in out)
    report = out[0]["report"]
    assert report["complete"] is False and report["inconsistent"] == [] and report["unexpected"] == []
    m = Model.of(ckpts.path)
    stage = stage_of_layer(m, lay, int(BIAS.split(".")[2]))
    owners = owners_of(m, lay, BIAS)
    assert owners == list(range(stage * lay.tp * lay.dp, (stage + 1) * lay.tp * lay.dp))  # the whole stage
    assert report["missing"] == [{"name": BIAS, "owners": owners}]
    for o in out[1:]:
        assert o["report"]["missing"] == report["missing"]
    for rank, stats in enumerate(report["ranks"]):
        lost = int(rank in owners)  # ranks of other stages own no unit of it
        assert stats["units_not_loaded"] == lost, f"rank {rank}"
        assert stats["units_owned"] == stats["units_loaded"] + lost, f"rank {rank}"


def test_mtp_tensor_is_ignored_not_unexpected(ckpts, tmp_path):
    lay = LAYOUTS[2]
    directory = copy_checkpoint(ckpts.path, str(tmp_path / "mtp"))
    put_tensors(directory, {MTP: torch.randn(32, 64)})
    assert MTP in headers(directory)
    out = ckpts.pool.run(lay.world, moe_jobs.load_report, directory, lay.options(), raise_errors=True)
    for o in out:
        report = o["report"]
        assert not o["raised"] and report["complete"] is True and report["ok"] is True
        assert report["ignored"] == [{"name": MTP, "rule": r"^model\.layers\.3\."}]
        assert report["unexpected"] == [] and report["missing"] == []
    # nobody reads it: the bytes are those of the checkpoint without it
    m = Model.of(ckpts.path)
    hdr = headers(ckpts.path)
    for rank, stats in enumerate(out[0]["report"]["ranks"]):
        need = needs(m, lay, rank, hdr)
        assert stats["units_owned"] == len(need)
        assert stats["bytes_read"] == sum((hdr[n][2] - hdr[n][1]) // k for n, k in need.items())


# ---------------------------------------------------------------- 3. yarn, as released configs set it

YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"}
"""DeepSeek-V3's own rope_scaling (config.json of the released checkpoints, with rope_theta 10000)"""


@pytest.fixture(scope="module")
def yarn_ckpt(ckpts, tmp_path_factory) -> tuple[str, torch.Tensor]:
    """The checkpoint with its config.json in the released form: ``rope_scaling`` yarn; and
    transformers' logits for it."""
    directory = copy_checkpoint(ckpts.path, str(tmp_path_factory.mktemp("ds3-yarn") / "ckpt"))
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("rope_parameters")
    config.update(rope_scaling=YARN, rope_theta=10000.0)
    with open(path, "w") as f:
        json.dump(config, f)
    return directory, hf_reference(directory, input_ids())[0]


@pytest.mark.parametrize("lay", [L("deepseek_v3", 1), L("deepseek_v3", 4, tp=2, dp=2, ep=2)], ids=lambda x: x.id)
def test_a_yarn_config_runs_forward_like_transformers(ckpts, yarn_ckpt, lay):
    directory, ref = yarn_ckpt
    default_rope = ckpts.reference()[0]  # the same weights under the default rope: yarn changes the logits
    assert ((ref - default_rope).abs().max() / ref.abs().max()).item() > 100 * TOLERANCE
    for rank, got in enumerate(ckpts.pool.run(lay.world, moe_jobs.load_forward_route, directory, lay.options(),
                                              input_ids(), raise_errors=True)):
        assert got["report"]["complete"] is True and got["report"]["ok"] is True
        err = ((torch.from_numpy(got["logits"]) - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE, f"rank {rank}: relative logits error {err:.3g}"
