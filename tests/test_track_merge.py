"""``distload.track``'s merge at 64 simulated ranks in one process (one thread per rank, collectives
that meet at a barrier), against ``load``'s own merge of the same simulated load: each rank of a
distload plan declares the units it owns as keys and marks those it read; both must name the same
tensors with the same owners, ``loaded_by`` and ``affects``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from distload.errors import ConfigError
from distload.layout import Layout
from distload.plan import plan
from distload.spec import ParamSpec, Role, Source
from distload.track import Expectations, Key, Recorder
from distload.track.merge import merge_with
from tests.synthetic import hf_shapes, llama_config, llama_plan, llama_specs, tensor_infos
from tests.track_sim import SimGroup, load_findings, moe_plan, plan_checkpoint, plan_rank, track_reports

CFG = llama_config()  # 2 layers, 16 heads, 8 kv heads, vocab 1000
WIDE = Layout(world_size=64, tp=8, dp=8)


def same_everywhere(reports) -> dict:
    for r in reports:
        if isinstance(r, BaseException):
            raise r
    first = reports[0].to_json()
    assert all(r.to_json() == first for r in reports[1:])
    return first


def by_name(entries) -> list[dict]:
    return sorted((e.to_json() for e in entries), key=lambda e: e["name"])


def assert_same_as_load(p, skip=None) -> dict:
    skip = skip or {}
    report = same_everywhere(track_reports(p, skip))
    found = load_findings(p, skip)
    for kind in ("missing", "inconsistent", "defaulted"):
        assert report[kind] == by_name(getattr(found, kind)), kind
    assert [u["name"] for u in report["unexpected"]] == list(p.unexpected)
    assert report["num_units"] == len(p.units)
    return report


def test_an_intact_load_has_no_findings_and_the_units_of_the_plan():
    report = assert_same_as_load(llama_plan(CFG, WIDE))
    assert report["complete"] and report["ok"] and report["mode"] == "track"
    assert [r["units_owned"] for r in report["ranks"]] == [r["units_loaded"] for r in report["ranks"]]


def test_deletions_and_skips_are_named_as_load_names_them():
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"
    norm = "model.norm.weight"
    p = llama_plan(CFG, WIDE, drop=["model.layers.1.mlp.down_proj.weight"])
    tp3 = set(WIDE.ranks_where(tp=3))
    report = assert_same_as_load(p, {**{r: {q} for r in tp3}, 9: {k, norm}, 63: {norm}})
    assert [e["name"] for e in report["missing"]] == ["model.layers.1.mlp.down_proj.weight"]
    entries = {e["name"]: e for e in report["inconsistent"]}
    assert set(entries) == {q, k, norm}
    assert entries[q]["loaded_by"] == [r for r in range(64) if r not in tp3]  # one shard lost everywhere


def test_experts_with_redundant_copies_name_only_their_hosts():
    lay = Layout(world_size=64, tp=2, dp=32, ep=8)  # expert tp 8; 24 slots: experts 0-7 twice
    name = "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    report = assert_same_as_load(moe_plan(lay, redundant=8, drop=[name]))
    (entry,) = report["missing"]
    assert entry["name"] == name and entry["owners"] == [*range(0, 8), *range(40, 48)]  # slots 1 and 17
    other = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    report = assert_same_as_load(moe_plan(lay, redundant=8), {44: {other}})
    assert report["inconsistent"][0]["loaded_by"] == [*range(0, 8), *range(40, 44), *range(45, 48)]


def test_optional_scales_are_defaulted_or_inconsistent_and_derived_parameters_affected():
    cfg = llama_config(tie_word_embeddings=True)
    kv = [ParamSpec(name=f"model.layers.{i}.self_attn.attn.k_scale", shape=(), role=Role.OPTIONAL, default=1.0,
                    sources=(Source(name=f"model.layers.{i}.self_attn.k_scale", shape=()),)) for i in range(2)]
    shapes = {**hf_shapes(cfg), "model.layers.1.self_attn.k_scale": ()}
    del shapes["model.embed_tokens.weight"]
    p = plan(tensor_infos(shapes, dtype=torch.float32), (*llama_specs(cfg, 8), *kv), WIDE)
    report = assert_same_as_load(p, {4: {"model.layers.1.self_attn.k_scale"}})
    assert report["missing"] == [{"name": "model.embed_tokens.weight", "owners": list(range(64)),
                                  "affects": ["lm_head.weight"]}]
    assert [e["name"] for e in report["defaulted"]] == ["model.layers.0.self_attn.k_scale"]
    assert report["inconsistent"][0]["loaded_by"] == [r for r in range(64) if r != 4]


def test_unexpected_tensors_are_those_no_rank_expects_or_consumes():
    p = llama_plan(CFG, Layout(world_size=4, tp=2, dp=2), extra={"model.layers.0.mlp.extra.weight": (4, 4),
                                                                 "model.rotary_emb.inv_freq": (8,)})
    report = assert_same_as_load(p)
    assert report["unexpected"] == [{"name": "model.layers.0.mlp.extra.weight"}]
    assert report["ignored"] == [{"name": "model.rotary_emb.inv_freq"}]


def _run(size: int, build, **options) -> list:
    infos = tensor_infos({"w": (8, 4), "s": ()}, dtype=torch.float32, num_files=1)
    ckpt = plan_checkpoint(plan(infos, [], Layout(world_size=1)))
    return SimGroup(size).run(lambda c: merge_with(c, *build(c.rank), checkpoint=ckpt, **options))


def _one(key: Key, *, optional=None, write=True) -> tuple[Expectations, Recorder]:
    exp = Expectations()
    exp.expect(key, param="w", optional=optional)
    rec = Recorder(exp, {})
    if write:
        rec.mark(key)
    return exp, rec


def test_a_key_optional_on_some_ranks_only_is_required():
    reports = _run(2, lambda r: _one(Key.of("s"), optional=1.0 if r == 0 else None, write=False))
    report = same_everywhere(reports)
    assert report["missing"] == [{"name": "s", "owners": [0, 1]}] and report["defaulted"] == []
    report = same_everywhere(_run(2, lambda r: _one(Key.of("s"), optional=1.0, write=False)))
    assert report["defaulted"] == [{"name": "s", "owners": [0, 1]}] and report["complete"]


def test_tracking_off_merges_nothing():
    calls = []

    class Counting(SimGroup):
        def exchange(self, rank, value):
            calls.append(rank)
            return super().exchange(rank, value)

    infos = tensor_infos({"w": (8, 4)}, dtype=torch.float32, num_files=1)
    ckpt = plan_checkpoint(plan(infos, [], Layout(world_size=1)))
    group = Counting(2)
    reports = group.run(lambda c: merge_with(c, *_one(Key.of("w"), write=False), checkpoint=ckpt,
                                             extra_config={"enable_weights_track": False}))
    assert calls == [] and all(r.complete is None and not r.tracked for r in reports)
    with pytest.raises(ConfigError) as err:
        merge_with(group, *_one(Key.of("w")), checkpoint=ckpt, extra_config={"enable_weights_track": "no"})
    assert str(err.value) == "enable_weights_track must be true, false or unset, got 'no'"


def test_ranks_that_disagree_on_the_checkpoint_are_refused():
    infos = [tensor_infos({"w": (8, 4)}, dtype=torch.float32, num_files=1),
             tensor_infos({"w": (8, 5)}, dtype=torch.float32, num_files=1)]
    ckpts = [plan_checkpoint(plan(i, [], Layout(world_size=1))) for i in infos]
    reports = SimGroup(3).run(lambda c: merge_with(c, *_one(Key.of("w")), checkpoint=ckpts[c.rank == 2]))
    assert [str(r) for r in reports] == [f"ranks [2] disagree with rank 0 before merging, in: checkpoint headers "
                                         f"(different checkpoints, layouts, model specs or distload versions) "
                                         f"[rank {r}]" for r in range(3)]


def test_keys_that_share_a_hash_are_refused_naming_them(monkeypatch):
    module = importlib.import_module("distload.track.expect")
    real = module.key_hash
    # both ranks' keys get the same 64-bit hash; their second hashes differ
    monkeypatch.setattr(module, "key_hash", lambda key: (0, real(key)[1]))
    reports = _run(2, lambda r: _one(Key.of("w", dim=0, index=r, num_shards=2)))
    assert [str(r) for r in reports] == [f"different keys share a 64-bit hash across ranks: w; rename one of "
                                         f"them [rank {r}]" for r in range(2)]
    reports = _run(1, lambda r: _two(Key.of("w", dim=0, index=0, num_shards=2), Key.of("w", dim=0, index=1,
                                                                                       num_shards=2)))
    assert str(reports[0]) == "rank 0: keys w and w share a 64-bit hash; rename one of them [rank 0]"


def test_a_rank_that_cannot_read_the_checkpoint_stops_every_rank(tmp_path):
    infos = tensor_infos({"w": (8, 4)}, dtype=torch.float32, num_files=1)
    ckpt = plan_checkpoint(plan(infos, [], Layout(world_size=1)))
    gone = str(tmp_path / "gone")
    reports = SimGroup(2).run(lambda c: merge_with(c, *_one(Key.of("w")), checkpoint=gone if c.rank else ckpt))
    assert [str(r) for r in reports] == [f"rank 1: checkpoint directory does not exist [file {gone}] [rank {r}]"
                                         for r in range(2)]


def _two(*keys: Key) -> tuple[Expectations, Recorder]:
    exp = Expectations()
    for k in keys:
        exp.expect(k, param="w")
    return exp, Recorder(exp, {})


def test_bytes_each_rank_sends_are_two_fixed_size_collectives_and_two_small_ones():
    p = llama_plan(CFG, WIDE)
    group, ckpt = SimGroup(64), plan_checkpoint(p)
    reports = group.run(lambda c: merge_with(c, *plan_rank(p, c.rank), checkpoint=ckpt, layout=WIDE))
    same_everywhere(reports)
    most = max(len(p.for_rank(r).owned) for r in range(64))
    agree = 8 * (6 + 16)  # six counts and the checkpoint fingerprint, as int64
    keys = 8 * (most + (most + 1) // 2)  # 64-bit hashes, then the 32-bit second hashes two per int64
    parts = 8 * 4  # this rank's part of the table: its units, failed, defaulted, colliding (none here)
    flags = len(p.tensors)  # int8 per checkpoint tensor
    assert group.sent == [agree + keys + parts + flags] * 64



def test_merge_over_a_world_of_one_forms_no_group_and_group_with_world_is_refused(tmp_path):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from distload import WorldInfo, track

    save_file({"w": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    one = WorldInfo(rank=0, world_size=1, local_rank=0)
    report = track.merge(*_one(Key.of("w")), checkpoint=str(tmp_path), world=one)
    assert (report.complete, report.ok, report.layout["world_size"]) == (True, True, 1) and not dist.is_initialized()
    with pytest.raises(ConfigError) as err:
        track.merge(*_one(Key.of("w")), checkpoint=str(tmp_path), world=one, group=object())
    assert str(err.value) == ("track.merge takes group= (an engine's process group) or world= (a group to form), "
                              "not both")
