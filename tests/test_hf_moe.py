"""Mixture-of-experts checkpoints written by Hugging Face transformers (mixtral, qwen2_moe with a
gated shared expert, qwen3_moe with q/k norms and a dense layer) loaded at world sizes 1, 2, 4
and 8 over tensor, data, pipeline and expert parallel layouts, linear and round-robin expert
placement, with and without redundant experts.

Everything expected is computed here, by arithmetic written for this test, not by distload:
which logical expert each local slot of each rank holds and which rows / columns of it;
which checkpoint tensors (and how many bytes of each) every rank needs, hence its units,
bytes and files; the owners of a deleted tensor. Byte ranges come from the safetensors
headers parsed here. Reference logits and routing decisions come from transformers itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

from distload import LoadConfig
from distload.prepare import prepare
from distload.comm import Collectives
from distload.dryrun import dry_run
from distload.layout import Layout
from distload.models import reference_model
from tests import moe_jobs
from tests.devices import and_on_gpus
from tests.hf_checkpoints import INDEX, MOE_SPECS, copy_checkpoint, delete_tensors, read_tensors, write_hf_checkpoint
from tests.moe_oracle import moe_input_ids as input_ids
from tests.moe_oracle import (L, assert_routes_and_logits, block, common_state, coords, dense_ffn_state, headers,
                              hf_reference, hosted, stage_of_layer)

pytest.importorskip("transformers")

SPECS = MOE_SPECS

# every checkpoint of a model loses the same tensors: an expert (one that has a redundant
# copy in the layouts that replicate), the router, and (qwen2_moe) a shared-expert matrix
DELETED = {
    "mixtral": ["model.layers.1.block_sparse_moe.experts.1.w3.weight", "model.layers.0.block_sparse_moe.gate.weight"],
    "qwen2_moe": ["model.layers.1.mlp.experts.1.up_proj.weight", "model.layers.0.mlp.shared_expert.gate_proj.weight",
                  "model.layers.1.mlp.gate.weight"],
    "qwen3_moe": ["model.layers.2.mlp.experts.5.down_proj.weight", "model.layers.0.mlp.gate.weight"],
}

LAYOUTS = [
    L("qwen3_moe", 1),
    L("mixtral", 2, tp=2),                                   # ep 1: each expert split over the TP pair
    L("qwen2_moe", 2, dp=2, ep=2),                           # 3 whole experts per rank
    L("mixtral", 4, tp=2, dp=2, ep=2, redundant=2),          # expert tp 2; experts 0, 1 on both groups
    L("qwen3_moe", 4, dp=4, ep=4, placement="round_robin"),  # ep = world: 2 experts per rank
    L("qwen3_moe", 4, tp=2, dp=2),                           # ep 1, dp 2: every replica holds every expert
    L("qwen2_moe", 4, tp=2, pp=2),                           # stages
    L("mixtral", 8, tp=2, dp=4, ep=4, redundant=4),          # 12 slots, 3 per group of 2 ranks
    L("qwen2_moe", 8, tp=2, dp=4, ep=4, placement="round_robin", redundant=2),
    L("mixtral", 8, tp=2, dp=4, ep=2),                       # expert tp 4: one expert over two replicas
    L("qwen2_moe", 8, tp=4, dp=2, ep=8, redundant=2),        # expert tp 1 < tp 4
    L("qwen3_moe", 8, tp=2, dp=2, pp=2, ep=2, placement="round_robin"),
]
IDS = [lay.id for lay in LAYOUTS]
ON_DEVICES = and_on_gpus(LAYOUTS, lambda lay: lay.world, IDS)


# ---------------------------------------------------------------- checkpoint facts, by hand


def config_of(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


@dataclass(frozen=True)
class Model:
    """The facts of a checkpoint's config a layout needs."""

    model_type: str
    num_layers: int
    num_experts: int
    heads: int
    kv_heads: int
    head_dim: int
    sparse: frozenset[int]

    @classmethod
    def of(cls, directory: str) -> "Model":
        c = config_of(directory)
        experts = c.get("num_local_experts") or c["num_experts"]
        dense = set(c.get("mlp_only_layers") or ())
        return cls(model_type=c["model_type"], num_layers=c["num_hidden_layers"], num_experts=experts,
                   heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                   sparse=frozenset(i for i in range(c["num_hidden_layers"]) if i not in dense))

    @property
    def block(self) -> str:
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def expert_names(self, layer: int, e: int) -> tuple[str, str, str]:
        """gate, up, down of expert ``e`` in ``layer``."""
        p = f"model.layers.{layer}.{self.block}.experts.{e}."
        if self.model_type == "mixtral":
            return p + "w1.weight", p + "w3.weight", p + "w2.weight"
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def needs(m: Model, lay: L, rank: int, names) -> dict[str, int]:
    """Checkpoint tensors ``rank`` needs a piece of -> into how many pieces that tensor is cut
    (the rank takes one). Attention heads and MLP rows split over tp (KV heads over at most
    their number), experts over the expert tp, norms / routers / the shared-expert gate whole."""
    tp_i, dp_i, pp_i = coords(lay, rank)
    experts, _, etp = hosted(m, lay, rank)
    kv = min(lay.tp, m.kv_heads)
    out = {}
    for name in names:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if stage_of_layer(m, lay, layer) != pp_i:
                continue
            if ".experts." in name:
                e = int(name.split(".experts.")[1].split(".")[0])
                if e in experts:
                    out[name] = etp
                continue
            if any(k in name for k in ("k_proj", "v_proj")):
                out[name] = kv
            elif any(k in name for k in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
                out[name] = lay.tp  # incl. the shared expert and dense MLP layers
            else:
                out[name] = 1  # norms, q/k norms, router, shared_expert_gate
        elif name == "model.embed_tokens.weight" and pp_i == 0:
            out[name] = lay.tp
        elif name in ("model.norm.weight", "lm_head.weight") and pp_i == lay.pp - 1:
            out[name] = 1 if name == "model.norm.weight" else lay.tp
    return out


def expected_state(ckpt: dict[str, torch.Tensor], m: Model, lay: L, rank: int) -> dict[str, torch.Tensor]:
    """The parameters ``rank`` must hold, sliced from the checkpoint by hand."""
    tp, (tp_i, _, pp_i) = lay.tp, coords(lay, rank)
    out = common_state(ckpt, m, lay, rank, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim)
    for layer in range(m.num_layers):
        if stage_of_layer(m, lay, layer) != pp_i:
            continue
        p = f"model.layers.{layer}."
        if layer not in m.sparse:
            out.update(dense_ffn_state(ckpt, p + "mlp.", tp, tp_i))
            continue
        b = p + m.block + "."
        out[b + "gate.weight"] = ckpt[b + "gate.weight"]
        experts, shard, etp = hosted(m, lay, rank)
        w13, w2 = [], []
        for e in experts:
            gate, up, down = (ckpt[n] for n in m.expert_names(layer, e))
            w13.append(torch.cat([block(gate, 0, etp, shard), block(up, 0, etp, shard)]))
            w2.append(block(down, 1, etp, shard))
        out[b + "experts.w13"], out[b + "experts.w2"] = torch.stack(w13), torch.stack(w2)
        if b + "shared_expert.gate_proj.weight" in ckpt:
            out.update(dense_ffn_state(ckpt, b + "shared_expert.", tp, tp_i))
            out[b + "shared_expert_gate.weight"] = ckpt[b + "shared_expert_gate.weight"]
    return out


def owners_of(m: Model, lay: L, name: str) -> list[int]:
    """Ranks that need a piece of ``name``."""
    return [r for r in range(lay.world) if name in needs(m, lay, r, [name])]


# ---------------------------------------------------------------- transformers' side


class Checkpoints:
    """Each model's checkpoint, its deleted-tensor copy, transformers' outputs, and load results,
    each made once per module."""

    def __init__(self, root, pool) -> None:
        self.root, self.pool = root, pool
        self._dirs: dict[str, str] = {}
        self._refs: dict[str, tuple] = {}
        self._runs: dict[tuple, list] = {}

    def path(self, name: str) -> str:
        if name not in self._dirs:
            self._dirs[name] = write_hf_checkpoint(str(self.root / name), SPECS[name])
        return self._dirs[name]

    def damaged(self, name: str) -> str:
        key = name + "-deleted"
        if key not in self._dirs:
            self._dirs[key] = copy_checkpoint(self.path(name), str(self.root / key))
            delete_tensors(self._dirs[key], DELETED[name])
        return self._dirs[key]

    def reference(self, name: str) -> tuple:
        if name not in self._refs:
            self._refs[name] = hf_reference(self.path(name), input_ids())
        return self._refs[name]

    def forward(self, lay: L, ranks=None) -> list[dict]:
        ranks = ranks or self.pool
        key = ("forward", lay, ranks.device)
        if key not in self._runs:
            self._runs[key] = ranks.run(lay.world, moe_jobs.load_forward_route, self.path(lay.model),
                                        lay.options(), input_ids(), ranks.device, raise_errors=True)
        return self._runs[key]

    def deleted(self, lay: L, ranks=None) -> list[dict]:
        ranks = ranks or self.pool
        key = ("deleted", lay, ranks.device)
        if key not in self._runs:
            self._runs[key] = ranks.run(lay.world, moe_jobs.load_report, self.damaged(lay.model), lay.options(),
                                        ranks.device, raise_errors=True)
        return self._runs[key]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pool) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("hf-moe"), pool)


def test_checkpoints_hold_per_expert_tensors_in_several_shards(ckpts):
    for name in SPECS:
        directory = ckpts.path(name)
        m = Model.of(directory)
        files = {f for f, _, _ in headers(directory).values()}
        names = set(headers(directory))
        assert len(files) > 2
        for layer in m.sparse:
            for e in range(m.num_experts):
                assert set(m.expert_names(layer, e)) <= names
        assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)  # not fused on disk


# ---------------------------------------------------------------- 1. exact parameters, logits, routing


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_params_exact_logits_and_routing_match_transformers(ckpts, lay, ranks):
    directory = ckpts.path(lay.model)
    m = Model.of(directory)
    ckpt = read_tensors(directory)
    hdr = headers(directory)
    ref_logits, ref_routes = ckpts.reference(lay.model)
    # the input reaches every expert in some layer, so the logits depend on every slot's weights
    assert {e for experts, _ in ref_routes.values() for e in experts.flatten().tolist()} == set(range(m.num_experts))
    out = ckpts.forward(lay, ranks)
    for rank, got in enumerate(out):
        report = got["report"]
        assert report["complete"] is True and report["ok"] is True
        assert report["layout"] == {"world_size": lay.world, "tp": lay.tp, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep}
        for kind in ("missing", "inconsistent", "unexpected", "defaulted", "mismatched"):
            assert report[kind] == [], (kind, report[kind])
        assert report == {**out[0]["report"], "seconds": report["seconds"]}

        want = expected_state(ckpt, m, lay, rank)
        assert sorted(got["state"]) == sorted(want), f"rank {rank}"
        for pname, w in want.items():
            have = torch.from_numpy(got["state"][pname])
            assert have.shape == w.shape and torch.equal(have, w), f"rank {rank}: {pname} differs"

        # every rank owns, loads and reads exactly the pieces it needs, from the files holding them
        need = needs(m, lay, rank, hdr)
        stats = report["ranks"][rank]
        assert stats["units_owned"] == stats["units_loaded"] == len(need), f"rank {rank}"
        assert stats["units_not_loaded"] == 0
        assert stats["bytes_read"] == sum((hdr[n][2] - hdr[n][1]) // k for n, k in need.items()), f"rank {rank}"
        assert stats["files_opened"] == len({hdr[n][0] for n in need}), f"rank {rank}"

        assert_routes_and_logits(got, m, lay, rank, ref_logits, ref_routes)


# ---------------------------------------------------------------- 2. missing and inconsistent


@pytest.mark.parametrize("lay,ranks", ON_DEVICES, indirect=["ranks"])
def test_deleted_expert_shared_and_router_are_missing_once_with_their_owners(ckpts, lay, ranks):
    m = Model.of(ckpts.path(lay.model))
    out = ckpts.deleted(lay, ranks)
    assert all(o["raised"] for o in out)
    report = out[0]["report"]
    for o in out[1:]:
        for kind in ("missing", "inconsistent", "unexpected", "complete", "ranks"):
            assert o["report"][kind] == report[kind], kind
    assert report["complete"] is False and report["inconsistent"] == [] and report["unexpected"] == []
    deleted = DELETED[lay.model]
    assert sorted(e["name"] for e in report["missing"]) == sorted(deleted)  # each once
    by_name = {e["name"]: e for e in report["missing"]}
    for name in deleted:
        want = owners_of(m, lay, name)
        assert by_name[name] == {"name": name, "owners": want}, name
        if ".experts." in name:  # only the hosts of that expert's copies, all its shard holders
            e = int(name.split(".experts.")[1].split(".")[0])
            copies = (lay.redundant > e) + 1
            per_copy = lay.tp if lay.ep == 1 else lay.tp * lay.dp // lay.ep
            replicas = lay.dp if lay.ep == 1 else 1
            assert len(want) == copies * per_copy * replicas
        else:  # router and shared expert: the whole stage
            layer = int(name.split(".")[2])
            stage = stage_of_layer(m, lay, layer)
            assert want == list(range(stage * lay.tp * lay.dp, (stage + 1) * lay.tp * lay.dp))
    # no rank counts a unit it does not own as not loaded (non-local experts stay silent)
    for rank, stats in enumerate(report["ranks"]):
        mine = needs(m, lay, rank, deleted)
        assert stats["units_not_loaded"] == len(mine), f"rank {rank}"
        assert stats["units_owned"] == stats["units_loaded"] + len(mine)


# (layout, rank -> skipped names, skipped name, owners, loaded_by)
SKIPPED = [
    # 12 slots linear over 4 groups of 2 ranks: expert 1 in slot 1 (group 0: ranks 0, 1) and slot 9
    # (group 3: ranks 6, 7); rank 6 drops its row half of the copy, rank 0 still has that half
    (L("mixtral", 8, tp=2, dp=4, ep=4, redundant=4), {6: ("model.layers.0.block_sparse_moe.experts.1.w1.weight",)},
     "model.layers.0.block_sparse_moe.experts.1.w1.weight", [0, 1, 6, 7], [0, 1, 7]),
    # round robin, 8 slots over 4 groups: expert 0 in slot 0 (group 0: ranks 0, 1) and slot 6 (group 2:
    # ranks 4, 5); rank 1 drops its column half of the down projection
    (L("qwen2_moe", 8, tp=2, dp=4, ep=4, placement="round_robin", redundant=2),
     {1: ("model.layers.1.mlp.experts.0.down_proj.weight",)},
     "model.layers.1.mlp.experts.0.down_proj.weight", [0, 1, 4, 5], [0, 4, 5]),
    # ep 1, dp 2: both replicas hold expert 3, each over its TP pair; rank 3 drops its half
    (L("qwen3_moe", 4, tp=2, dp=2), {3: ("model.layers.0.mlp.experts.3.gate_proj.weight",)},
     "model.layers.0.mlp.experts.3.gate_proj.weight", [0, 1, 2, 3], [0, 1, 2]),
]


@pytest.mark.parametrize("lay,skip,name,owners,loaded_by", SKIPPED, ids=[s[0].id for s in SKIPPED])
def test_expert_copy_skipped_on_one_host_is_inconsistent(ckpts, lay, skip, name, owners, loaded_by):
    m = Model.of(ckpts.path(lay.model))
    assert owners_of(m, lay, name) == owners
    out = ckpts.pool.run(lay.world, moe_jobs.load_report, ckpts.path(lay.model),
                         {**lay.options(), "skip_units": skip}, raise_errors=True)
    assert all(o["raised"] for o in out)
    report = out[0]["report"]
    assert report["missing"] == []
    assert report["inconsistent"] == [{"name": name, "owners": owners, "loaded_by": loaded_by}]
    for o in out[1:]:
        assert o["report"]["inconsistent"] == report["inconsistent"]


# ---------------------------------------------------------------- 3. local expert filtering


EP_LAYOUTS = [lay for lay in LAYOUTS if lay.ep > 1]


def reshard_by_expert(src: str, dst: str) -> str:
    """Rewrites a checkpoint with the dense tensors in one file and each (layer, expert)'s
    three matrices in a file of their own (transformers 5 shards a layer's fused experts as
    one block, so its files always mix every expert of a layer)."""
    from safetensors.torch import save_file

    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in read_tensors(src).items():
        if ".experts." in name:
            layer, expert = name.split(".")[2], name.split(".experts.")[1].split(".")[0]
            fname = f"experts-{layer}-{expert}.safetensors"
        else:
            fname = "dense.safetensors"
        files.setdefault(fname, {})[name] = t
    for fname, tensors in files.items():
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
    with open(os.path.join(dst, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: fn for fn, ts in files.items() for n in ts}}, f)
    return dst


def test_rank_at_ep_equal_world_reads_the_dense_part_and_its_share_of_experts(ckpts, tmp_path):
    lay = L("qwen3_moe", 4, dp=4, ep=4, placement="round_robin")
    assert lay.ep == lay.world and lay.tp == 1
    m = Model.of(ckpts.path(lay.model))
    directory = reshard_by_expert(ckpts.path(lay.model), str(tmp_path / "by-expert"))
    hdr = headers(directory)
    size = {n: end - begin for n, (_, begin, end) in hdr.items()}
    experts = sum(s for n, s in size.items() if ".experts." in n)
    dense = sum(s for n, s in size.items() if ".experts." not in n)
    out = ckpts.pool.run(lay.world, moe_jobs.load_report, directory, lay.options(), raise_errors=True)
    assert not out[0]["raised"] and out[0]["report"]["complete"] is True
    for rank, stats in enumerate(out[0]["report"]["ranks"]):
        share = dense + experts / lay.ep
        assert abs(stats["bytes_read"] - share) <= 0.1 * share, f"rank {rank}"
        assert stats["bytes_read"] < dense + experts / 2
        # the dense file, and one file per (sparse layer, hosted expert): no other expert's file
        mine, _, _ = hosted(m, lay, rank)
        assert stats["files_opened"] == 1 + len(m.sparse) * len(mine) == 5, f"rank {rank}"


def _runs(read) -> list[tuple[int, int]]:
    return [(read.offset + i * read.stride, read.offset + i * read.stride + read.run) for i in range(read.count)]


@pytest.mark.parametrize("lay", EP_LAYOUTS, ids=[lay.id for lay in EP_LAYOUTS])
def test_planned_reads_touch_no_byte_of_a_non_local_expert(ckpts, lay):
    directory = ckpts.path(lay.model)
    m = Model.of(directory)
    hdr = headers(directory)
    config = LoadConfig(device="cpu", **lay.options())
    layout = Layout(world_size=lay.world, tp=lay.tp, dp=lay.dp, pp=lay.pp, ep=lay.ep)
    for rank in range(lay.world):
        *_, plan = prepare(directory, config, layout, reference_model, rank=rank, ops=Collectives(None, lay.tp),
                           stage_ops=Collectives(None, lay.tp * lay.dp))
        reads = plan.for_rank(rank).reads
        need = needs(m, lay, rank, hdr)
        touched = set()
        for read in reads:
            assert read.tensor.name in need, f"rank {rank} reads {read.tensor.name}"
            fname = os.path.basename(read.tensor.file)
            for start, stop in _runs(read):  # every byte run lies inside the tensor it is for
                hits = {n for n, (f, b, e) in hdr.items() if f == fname and start < e and b < stop}
                assert hits == {read.tensor.name}, f"rank {rank}: a read of {read.tensor.name} touches {hits}"
                touched |= hits
        local = {n for n in need if ".experts." in n}
        remote = {n for n in hdr if ".experts." in n} - local
        assert local and remote and local <= touched and not (remote & touched)


# ---------------------------------------------------------------- 4. dry run == real load


WORLD_8 = [lay for lay in LAYOUTS if lay.world == 8]


@pytest.mark.parametrize("lay", WORLD_8, ids=[lay.id for lay in WORLD_8])
def test_dry_run_report_equals_the_real_load(ckpts, lay):
    directory = ckpts.damaged(lay.model)
    real = ckpts.deleted(lay)[0]["report"]
    planned_report = dry_run(directory, LoadConfig(**lay.options()), world_size=8)
    planned = planned_report.to_json()
    assert planned["mode"] == "dry-run" and real["mode"] == "load"
    for key in ("complete", "ok", "layout", "num_units", "missing", "inconsistent", "unexpected", "defaulted",
                "bytes_read"):
        assert planned[key] == real[key], key
    assert planned["missing"]
    keys = ("rank", "units_loaded", "units_owned", "units_not_loaded", "bytes_read", "files_opened")
    rows = [planned_report.stats_of(rank).to_json() for rank in range(8)]
    assert [{k: r[k] for k in keys if k != "rank"} for r in rows] == \
           [{k: r[k] for k in keys if k != "rank"} for r in real["ranks"]]
