"""The pure merge (record / classify / exchange_rows / findings) with simulated ranks.

Each simulated rank records the units of its planned reads, minus the checkpoint names
it is told to drop; the "all_reduce" is a sum over the stacked records and the
"all_gather" of exchange rows is a stack, exactly what comm does across processes.
"""

from __future__ import annotations

import math

import pytest
import torch

from distload import tracking
from distload.checkpoint.header import TensorInfo
from distload.layout import Layout
from distload.plan import Plan, plan
from distload.spec import ParamSpec, Role, Source
from tests.synthetic import hf_shapes, llama_config, llama_plan, llama_specs, tensor_infos

CFG = llama_config()  # 2 layers, 16 heads, 8 kv heads, vocab 1000
WIDE = Layout(world_size=512, tp=8, dp=64)


def simulate(p: Plan, *, skip: dict[int, set[str]] | None = None,
             mismatch: dict[int, set[str]] | None = None):
    """Returns (verdict, findings, per-rank records) for a load where rank r drops ``skip[r]``."""
    skip, mismatch = skip or {}, mismatch or {}
    records = []
    for rank in range(p.layout.world_size):
        rp = p.for_rank(rank)
        loaded = [r.unit for r in rp.reads if r.tensor.name not in skip.get(rank, ())]
        bad = [r.unit for r in rp.reads if r.verify and r.tensor.name in mismatch.get(rank, ())]
        records.append(tracking.record(p, loaded, bad))
    totals = torch.stack(records).sum(0)
    verdict = tracking.classify(p, totals)
    rows = None
    if verdict.failed or verdict.mismatched:
        rows = torch.stack([tracking.exchange_rows(p, verdict, r) for r in records])
        assert rows.shape == (p.layout.world_size, len(verdict.failed) + len(verdict.mismatched))
    return verdict, tracking.findings(p, verdict, rows), records


def everyone_but(world: int, *ranks: int) -> tuple[int, ...]:
    return tuple(r for r in range(world) if r not in ranks)


@pytest.fixture(scope="module")
def wide() -> Plan:
    return llama_plan(CFG, WIDE)


def test_record_is_a_count_vector_with_a_verify_tail():
    from distload.spec import ParamSpec, Role, Shard, Source
    infos = tensor_infos({"w": (4, 2), "v": (4, 2)}, dtype=torch.float32, num_files=1)
    specs = [ParamSpec(name="w", shape=(2, 2), sources=(Source(name="w", shape=(4, 2), shard=Shard(dim=0, num_shards=2)),)),
             ParamSpec(name="t", shape=(2, 2), role=Role.DERIVED, derived_from=("w",),
                       verify=(Source(name="v", shape=(4, 2), shard=Shard(dim=0, num_shards=2)),))]
    from distload.plan import plan as make_plan
    p = make_plan(infos, specs, Layout(world_size=2, tp=2))
    assert p.verify_units == (2, 3)
    rec = tracking.record(p, [0, 3], [3], dtype=torch.int8)
    assert rec.dtype == torch.int8 and rec.tolist() == [1, 0, 0, 1, 0, 1]
    assert tracking.record(p, []).tolist() == [0, 0, 0, 0, 0, 0]
    assert tracking.count_dtype(8) == torch.int8 and tracking.count_dtype(4096) == torch.int32


def test_expected_counts_are_the_owner_counts(wide):
    expected = tracking.expected_counts(wide).tolist()
    assert expected == [len(wide.owners(u)) for u in range(len(wide.units))]
    assert set(expected) == {64, 512}  # a TP shard: one rank per replica; a norm: every rank


def test_complete_load_has_no_findings(wide):
    verdict, found, records = simulate(wide)
    assert verdict == tracking.Verdict(failed=(), defaulted=(), mismatched=())
    assert found.complete and not (found.missing or found.inconsistent or found.defaulted or found.mismatched)
    n = len(wide.units)
    assert torch.equal(torch.stack(records).sum(0)[:n].to(torch.int32), tracking.expected_counts(wide))


def test_a_rank_never_contributes_to_a_unit_it_does_not_own(wide):
    _, _, records = simulate(wide)
    stacked = torch.stack(records)  # [world, units + verify units]
    for u in range(len(wide.units)):
        owners = set(wide.owners(u))
        others = [r for r in range(WIDE.world_size) if r not in owners]
        assert int(stacked[others, u].sum()) == 0
        assert int(stacked[list(owners), u].sum()) == len(owners)


def test_absent_tensor_is_missing_once_with_all_owners(wide):
    name = "model.layers.1.mlp.down_proj.weight"
    p = llama_plan(CFG, WIDE, drop=[name])
    verdict, found, _ = simulate(p)
    assert len(verdict.failed) == 8  # one unit per TP shard ...
    assert [e.name for e in found.missing] == [name]  # ... one entry per name
    entry = found.missing[0]
    assert entry.owners == tuple(range(512)) and entry.loaded_by == () and entry.affects == ()
    assert not found.inconsistent and not found.complete
    assert entry.to_json() == {"name": name, "owners": list(range(512))}


def test_rank_that_skips_a_shard_makes_it_inconsistent_naming_loaded_by(wide):
    name = "model.layers.0.self_attn.q_proj.weight"
    verdict, found, _ = simulate(wide, skip={77: {name}})
    assert len(verdict.failed) == 1
    assert wide.units[verdict.failed[0]].index == WIDE.coords(77).tp
    assert not found.missing
    (entry,) = found.inconsistent
    assert entry.name == name
    assert entry.owners == tuple(range(512))  # union over the tensor's 8 shards
    assert entry.loaded_by == everyone_but(512, 77)


def test_replicated_unit_skipped_by_some_ranks(wide):
    name = "model.norm.weight"
    dropped = {0, 255, 511}
    verdict, found, _ = simulate(wide, skip={r: {name} for r in dropped})
    (entry,) = found.inconsistent
    assert entry.name == name and entry.owners == tuple(range(512))
    assert entry.loaded_by == everyone_but(512, *dropped)


def test_replicated_unit_skipped_by_every_rank_is_missing(wide):
    name = "model.layers.1.input_layernorm.weight"
    _, found, _ = simulate(wide, skip={r: {name} for r in range(512)})
    assert [e.name for e in found.missing] == [name] and not found.inconsistent
    assert found.missing[0].owners == tuple(range(512))


def test_a_shard_no_owner_loaded_is_named_with_the_ranks_that_did(wide):
    """Grouped by name: shard 3 of a tensor lost on every replica while the other shards
    loaded is one entry, inconsistent, whose loaded_by leaves out exactly the TP-3 ranks."""
    name = "model.layers.0.mlp.gate_proj.weight"
    tp3 = set(WIDE.ranks_where(tp=3))
    verdict, found, _ = simulate(wide, skip={r: {name} for r in tp3})
    assert len(verdict.failed) == 1 and wide.units[verdict.failed[0]].index == 3
    (entry,) = found.inconsistent
    assert entry.loaded_by == everyone_but(512, *tp3)
    assert not found.missing


def test_several_failures_are_grouped_and_kept_apart(wide):
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    up = "model.layers.1.mlp.up_proj.weight"
    p = llama_plan(CFG, WIDE, drop=[up])
    # two different ranks drop q (two different units of one name); rank 9 drops k only
    verdict, found, _ = simulate(p, skip={1: {q}, 10: {q}, 9: {k}})
    assert [e.name for e in found.missing] == [up]
    assert [e.name for e in found.inconsistent] == [q, k]  # unit-table order
    entries = {e.name: e for e in found.inconsistent}
    assert entries[q].loaded_by == everyone_but(512, 1, 10)
    assert entries[k].loaded_by == everyone_but(512, 9)  # dropping k never marks q or v
    assert len(verdict.failed) == 8 + 2 + 1


def test_loading_q_never_marks_k_or_v(wide):
    """Fused qkv: one read per source; a rank that loads q but not k and v fails k and v only."""
    k = "model.layers.1.self_attn.k_proj.weight"
    v = "model.layers.1.self_attn.v_proj.weight"
    _, found, _ = simulate(wide, skip={3: {k, v}})
    assert [e.name for e in found.inconsistent] == [k, v]


# ---- optional, derived, verify -----------------------------------------------------------------


def with_kv_scales(cfg: dict, layout: Layout, present: bool) -> Plan:
    """The Llama specs plus an optional per-layer k_scale (default 1.0), present or not."""
    optional = [ParamSpec(name=f"model.layers.{i}.self_attn.attn.k_scale", shape=(), role=Role.OPTIONAL,
                          default=1.0, sources=(Source(name=f"model.layers.{i}.self_attn.k_scale", shape=()),))
                for i in range(cfg["num_hidden_layers"])]
    shapes = hf_shapes(cfg)
    if present:
        shapes.update({s.sources[0].name: () for s in optional})
    infos = tensor_infos(shapes, dtype=torch.float32)
    return plan(infos, (*llama_specs(cfg, layout.tp), *optional), layout)


def test_absent_optional_is_defaulted_not_missing():
    p = with_kv_scales(CFG, WIDE, present=False)
    verdict, found, _ = simulate(p)
    assert not verdict.failed and len(verdict.defaulted) == 2
    assert found.complete
    assert [e.name for e in found.defaulted] == ["model.layers.0.self_attn.k_scale", "model.layers.1.self_attn.k_scale"]
    assert all(e.owners == tuple(range(512)) for e in found.defaulted)
    assert all(p.units[u].role is Role.OPTIONAL for u in verdict.defaulted)
    # every rank fills the default before reading
    assert ("model.layers.0.self_attn.attn.k_scale", 1.0) in p.for_rank(300).defaults


def test_present_optional_loaded_by_some_owners_is_inconsistent():
    p = with_kv_scales(CFG, WIDE, present=True)
    name = "model.layers.1.self_attn.k_scale"
    _, found, _ = simulate(p, skip={r: {name} for r in (4, 400)})
    assert not found.defaulted and not found.missing
    (entry,) = found.inconsistent
    assert entry.name == name and entry.loaded_by == everyone_but(512, 4, 400)
    _, found, _ = simulate(p)
    assert not found.defaulted and found.complete


def test_missing_source_names_the_derived_parameters_it_affects():
    cfg = llama_config(tie_word_embeddings=True)
    p = llama_plan(cfg, WIDE, drop=["model.embed_tokens.weight"])
    _, found, _ = simulate(p)
    (entry,) = found.missing
    assert entry.name == "model.embed_tokens.weight"
    assert entry.affects == ("lm_head.weight",)
    assert entry.to_json()["affects"] == ["lm_head.weight"]
    # an inconsistent source names them too
    p = llama_plan(cfg, WIDE)
    _, found, _ = simulate(p, skip={6: {"model.embed_tokens.weight"}})
    assert found.inconsistent[0].affects == ("lm_head.weight",)


def test_verified_copy_that_differs_is_mismatched_on_the_ranks_that_saw_it():
    cfg = llama_config(tie_word_embeddings=True)
    p = llama_plan(cfg, WIDE, extra={"lm_head.weight": (cfg["vocab_size"], cfg["hidden_size"])})
    assert not p.unexpected
    verdict, found, _ = simulate(p, mismatch={2: {"lm_head.weight"}, 131: {"lm_head.weight"}})
    assert found.complete and len(verdict.mismatched) == 2  # two TP shards
    (entry,) = found.mismatched
    assert entry.name == "lm_head.weight" and entry.differs_on == (2, 131)
    assert entry.owners == tuple(range(WIDE.world_size))  # every rank holds a vocabulary block
    assert entry.against == "model.embed_tokens.weight"
    # compared with an embedding that was itself never loaded: reported as missing only
    verdict, found, _ = simulate(p, skip={r: {"model.embed_tokens.weight"} for r in range(WIDE.world_size)},
                                 mismatch={2: {"lm_head.weight"}})
    assert verdict.mismatched and not found.mismatched
    assert found.missing[0].name == "model.embed_tokens.weight"
    assert found.missing[0].affects == ("lm_head.weight",)
    # a verify unit a rank did not read is counted like any other unit
    _, found, _ = simulate(p, skip={5: {"lm_head.weight"}})
    assert found.inconsistent[0].name == "lm_head.weight"


# ---- no false alarms from ranks that own nothing -----------------------------------------------


def test_padding_only_ranks_own_nothing_and_raise_no_alarm():
    cfg = llama_config(vocab_size=13, num_attention_heads=8, num_key_value_heads=8)
    layout = Layout(world_size=64, tp=8, dp=8)
    p = llama_plan(cfg, layout)
    _, found, _ = simulate(p)
    assert found.complete
    p = llama_plan(cfg, layout, drop=["model.embed_tokens.weight"])
    _, found, _ = simulate(p)
    (entry,) = found.missing
    # TP rank 7's piece is only padding: it owns no unit of the embedding, so is not an owner
    assert entry.owners == tuple(r for r in range(64) if layout.coords(r).tp != 7)


# ---- at thousands of ranks ---------------------------------------------------------------------


def test_merge_at_4096_ranks_with_replicated_kv_heads():
    cfg = llama_config(vocab_size=32003, hidden_size=512, intermediate_size=1408, num_hidden_layers=1,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=8)
    layout = Layout(world_size=4096, tp=64, dp=64)
    k = "model.layers.0.self_attn.k_proj.weight"
    v = "model.layers.0.self_attn.v_proj.weight"
    p = llama_plan(cfg, layout, drop=[v])
    # rank 1234 holds (with 7 TP neighbours) a replicated k piece; it alone drops it
    verdict, found, records = simulate(p, skip={1234: {k}})
    assert [e.name for e in found.missing] == [v]
    assert found.missing[0].owners == tuple(range(4096))
    (entry,) = found.inconsistent
    assert entry.name == k and entry.loaded_by == everyone_but(4096, 1234)
    k_failed = [u for u in verdict.failed if p.units[u].name == k]
    assert len(k_failed) == 1
    piece_owners = p.owners(k_failed[0])
    assert 1234 in piece_owners and len(piece_owners) == 8 * 64
    totals = torch.stack(records).sum(0)
    assert int(totals[k_failed[0]]) == 8 * 64 - 1


def test_unit_table_size_is_independent_of_world_size():
    sizes = {len(llama_plan(CFG, Layout(world_size=w, tp=8, dp=w // 8)).units) for w in (8, 64, 4096)}
    assert len(sizes) == 1


def test_tensor_info_helper_is_consistent():
    infos = tensor_infos({"a": (3, 4), "b": (5,)}, dtype=torch.float32, num_files=1)
    assert isinstance(infos["a"], TensorInfo)
    assert infos["a"].nbytes == 48 and infos["b"].begin == infos["a"].end
    assert math.prod(infos["b"].shape) * 4 == infos["b"].nbytes
