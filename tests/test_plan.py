"""The pure planner at thousands of simulated ranks: coverage, ownership, tiling, byte ranges.

No processes and no data files: checkpoints are synthetic header metadata
(``tests.synthetic``), specs come from distload's reference models on the meta device.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from distload.checkpoint.header import TensorInfo
from distload.errors import PlanError
from distload.layout import Layout
from distload.models import build_model
from distload.plan import DEFAULT_IGNORE, Plan, check_tiling, plan
from distload.spec import ParamSpec, Role, Shard, Source
from tests.synthetic import hf_shapes, llama_config, llama_plan, llama_specs, tensor_infos

# Llama-shaped, small enough that 4,096 ranks plan in about a second each; the vocabulary
# (32003) divides neither 8 nor 64, so the last TP rank's embedding and head are padded.
BIG_CFG = llama_config(vocab_size=32003, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=8)
BIG_LAYOUTS = {"tp8-dp512": Layout(world_size=4096, tp=8, dp=512),   # tp == kv heads
               "tp64-dp64": Layout(world_size=4096, tp=64, dp=64)}   # tp > kv heads: k/v replicated x8


def intervals(read) -> list[tuple[int, int]]:
    """The absolute byte ranges one read requests."""
    return [(read.offset + i * read.stride, read.offset + i * read.stride + read.run) for i in range(read.count)]


class Sweep:
    """Everything the all-ranks checks need, gathered in one pass over every rank's plan."""

    def __init__(self, p: Plan) -> None:
        self.plan = p
        layout = p.layout
        self.readers: dict[int, set[int]] = collections.defaultdict(set)
        self.owned_by: dict[int, set[int]] = collections.defaultdict(set)
        self.read_outside_owned: list[tuple[int, int]] = []
        # one full TP group's plans, and the plans of TP rank t in replica 0, for comparisons
        self.group = [p.for_rank(layout.rank(tp=t, dp=0)) for t in range(layout.tp)]
        self.sample_equal = True
        for rank in range(layout.world_size):
            rp = p.for_rank(rank)
            assert rp.rank == rank
            owned = set(rp.owned)
            for r in rp.reads:
                self.readers[r.unit].add(rank)
                if r.unit not in owned:
                    self.read_outside_owned.append((rank, r.unit))
            for u in owned:
                self.owned_by[u].add(rank)
            if rank % 97 == 0:  # every DP replica plans like replica 0 for the same TP rank
                ref = self.group[layout.coords(rank).tp]
                self.sample_equal &= (ref.reads, ref.zero, ref.owned) == (rp.reads, rp.zero, rp.owned)


@pytest.fixture(scope="module", params=list(BIG_LAYOUTS), ids=list(BIG_LAYOUTS))
def sweep(request) -> Sweep:
    return Sweep(llama_plan(BIG_CFG, BIG_LAYOUTS[request.param]))


def test_every_unit_is_read_by_all_its_owners_and_no_other_rank(sweep):
    p = sweep.plan
    assert sweep.sample_equal
    assert not sweep.read_outside_owned
    for u in range(len(p.units)):
        owners = p.owners(u)
        assert list(owners) == sorted(set(owners))
        assert sweep.readers[u] == set(owners), p.units[u]
        assert sweep.owned_by[u] == set(owners), p.units[u]
        assert p.num_owners(u) == len(owners)


def test_owners_follow_the_tp_index_in_every_replica(sweep):
    p = sweep.plan
    layout = p.layout
    for u, unit in enumerate(p.units):
        owners = p.owners(u)
        tp_indices = {layout.coords(r).tp for r in owners}
        width = layout.tp // unit.num_shards
        assert tp_indices == set(range(unit.index * width, (unit.index + 1) * width))
        assert len(owners) == width * layout.dp * layout.pp


def test_replicated_units_are_owned_by_every_rank(sweep):
    p = sweep.plan
    replicated = [u for u, unit in enumerate(p.units) if unit.dim is None]
    names = {p.units[u].name for u in replicated}
    assert names == {n for n in hf_shapes(BIG_CFG) if n.endswith("norm.weight")}
    for u in replicated:
        assert p.owners(u) == tuple(range(p.layout.world_size))


def test_units_of_one_tensor_are_disjoint_and_complete(sweep):
    p = sweep.plan
    by_name = collections.defaultdict(list)
    for unit in p.units:
        by_name[unit.name].append(unit)
    assert set(by_name) == set(hf_shapes(BIG_CFG))  # every checkpoint tensor has units
    for name, units in by_name.items():
        size_dims = p.tensors[name].shape
        if units[0].dim is None:
            assert len(units) == 1
            continue
        dim = units[0].dim
        assert {u.dim for u in units} == {dim}
        assert [u.index for u in units] == list(range(len(units)))
        cursor = 0
        for u in sorted(units, key=lambda u: u.span):
            assert u.span[0] == cursor and u.span[1] > u.span[0], name
            cursor = u.span[1]
        assert cursor == size_dims[dim], name


def test_byte_ranges_of_a_tp_group_tile_each_tensor(sweep):
    """Within one TP group, distinct units' bytes are disjoint and together are the whole tensor;
    ranks holding the same (replicated) unit request the same bytes."""
    p = sweep.plan
    ranges: dict[str, dict[int, list[tuple[int, int]]]] = collections.defaultdict(dict)
    for rp in sweep.group:
        for r in rp.reads:
            got = intervals(r)
            seen = ranges[r.tensor.name].setdefault(r.unit, got)
            assert seen == got
    assert set(ranges) == set(p.tensors)
    for name, by_unit in ranges.items():
        info = p.tensors[name]
        cursor = info.begin
        for start, stop in sorted(iv for ivs in by_unit.values() for iv in ivs):
            assert start == cursor, f"{name}: gap or overlap at byte {start}"
            cursor = stop
        assert cursor == info.end, name


def test_group_reads_exactly_one_copy_of_the_checkpoint_per_replica_share(sweep):
    p = sweep.plan
    total = sum(info.nbytes for info in p.tensors.values())
    per_unit = {}
    for rp in sweep.group:
        for r in rp.reads:
            per_unit[r.unit] = r.nbytes
    assert sum(per_unit.values()) == total


def test_each_read_requests_exactly_its_piece(sweep):
    p = sweep.plan
    for rp in sweep.group:
        tp_i = p.layout.coords(rp.rank).tp
        for r in rp.reads:
            info = r.tensor
            assert r.nbytes == math.prod(r.shape) * info.itemsize
            assert info.begin <= r.offset and r.offset + (r.count - 1) * r.stride + r.run <= info.end
            unit = p.units[r.unit]
            if unit.dim is None:
                assert (r.offset, r.count, r.run, r.shape) == (info.begin, 1, info.nbytes, info.shape)
            elif unit.dim == 0:
                assert r.count == 1  # a row block is one contiguous run
                assert r.offset == info.begin + unit.span[0] * info.nbytes // info.shape[0]
            else:  # row-parallel: one run per row, only this rank's columns
                rows, cols = info.shape
                width = cols // p.layout.tp
                assert unit.dim == 1 and unit.index == tp_i
                assert (r.count, r.run, r.stride) == (rows, width * info.itemsize, cols * info.itemsize)
                assert r.offset == info.begin + tp_i * width * info.itemsize
                assert r.shape == (rows, width)
                assert r.nbytes == info.nbytes // p.layout.tp  # never more than the shard


def test_units_tile_every_parameter_on_every_tp_rank(sweep):
    p = sweep.plan
    tp = p.layout.tp
    for spec in p.specs:
        check_tiling(spec, tp, tp_ranks=range(tp))
    specs = {s.name: s for s in p.specs}
    for rp in sweep.group:
        assert_reads_fill_parameters(p, rp, specs)


def assert_reads_fill_parameters(p: Plan, rp, specs: dict[str, ParamSpec]) -> None:
    """Independent of check_tiling: places every read into its parameter and counts coverage."""
    by_param = collections.defaultdict(list)
    for r in rp.reads:
        if not r.verify:
            by_param[r.param].append(r)
    for name, spec in specs.items():
        reads = by_param.pop(name, [])
        if not spec.sources:
            assert not reads
            continue
        if not reads:  # only a rank whose whole piece is vocabulary padding reads nothing
            assert name in rp.zero and all(s.shard.pad for s in spec.sources), f"rank {rp.rank}: nothing fills {name}"
            continue
        if reads[0].dim is None:
            assert len(reads) == 1 and reads[0].shape == spec.shape
            continue
        dim = reads[0].dim
        cover = torch.zeros(spec.shape[dim], dtype=torch.int32)
        for r in reads:
            assert r.dim == dim
            assert r.shape[:dim] + r.shape[dim + 1:] == spec.shape[:dim] + spec.shape[dim + 1:]
            assert r.dest[1] - r.dest[0] == r.shape[dim]
            cover[r.dest[0]:r.dest[1]] += 1
        assert int(cover.max()) == 1, f"rank {rp.rank}: overlapping reads in {name}"
        holes = int((cover == 0).sum())
        if name in rp.zero:  # padding rows: zeroed, read by nobody
            padding = sum(s.shard.piece_len(s.shape[dim]) for s in spec.sources) - sum(r.shape[dim] for r in reads)
            assert holes == padding > 0
            assert int(cover[spec.shape[dim] - holes:].sum()) == 0  # padding sits at the end
        else:
            assert holes == 0, f"rank {rp.rank}: {holes} rows of {name} are never written"
    assert not by_param


def test_vocab_padding_at_4096_ranks(sweep):
    p = sweep.plan
    tp = p.layout.tp
    rows = -(-BIG_CFG["vocab_size"] // tp)
    last = BIG_CFG["vocab_size"] - rows * (tp - 1)
    assert 0 < last < rows
    for rp in sweep.group:
        short = p.layout.coords(rp.rank).tp == tp - 1
        assert set(rp.zero) == ({"model.embed_tokens.weight", "lm_head.weight"} if short else set())
        emb = [r for r in rp.reads if r.tensor.name == "model.embed_tokens.weight"]
        assert len(emb) == 1 and emb[0].shape == ((last if short else rows), BIG_CFG["hidden_size"])


# ---- smaller plans for specific behaviours -------------------------------------------------------


def test_vocab_padding_creates_no_unit_for_pure_padding_pieces():
    # 13 rows over tp=8: pieces of 2 rows; piece 6 holds one row and piece 7 only padding
    cfg = llama_config(vocab_size=13, num_attention_heads=8, num_key_value_heads=8)
    layout = Layout(world_size=16, tp=8, dp=2)
    p = llama_plan(cfg, layout)
    emb = [u for u in p.units if u.name == "model.embed_tokens.weight"]
    assert [u.span for u in emb] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 13)]
    for rank in range(layout.world_size):
        rp = p.for_rank(rank)
        tp_i = layout.coords(rank).tp
        reads = [r for r in rp.reads if r.tensor.name == "model.embed_tokens.weight"]
        if tp_i == 7:
            assert not reads
            assert not [u for u in rp.owned if p.units[u].name == "model.embed_tokens.weight"]
        else:
            assert len(reads) == 1
        assert ("model.embed_tokens.weight" in rp.zero) == (tp_i >= 6)
        assert ("lm_head.weight" in rp.zero) == (tp_i >= 6)
    # the rank with only padding still has a parameter of the padded size, and it tiles
    specs = {s.name: s for s in p.specs}
    assert specs["model.embed_tokens.weight"].shape == (2, cfg["hidden_size"])
    for spec in p.specs:
        check_tiling(spec, 8, tp_ranks=range(8))
    for rank in range(8):
        assert_reads_fill_parameters(p, p.for_rank(rank), specs)


@pytest.mark.parametrize("tp, kv, kv_pieces", [(8, 2, 2), (16, 4, 4), (4, 8, 4), (2, 8, 2), (8, 8, 8)])
def test_gqa_kv_heads_split_or_replicate(tp, kv, kv_pieces):
    cfg = llama_config(num_attention_heads=16, num_key_value_heads=kv)
    layout = Layout(world_size=tp * 3, tp=tp, dp=3)
    p = llama_plan(cfg, layout)
    hd = cfg["head_dim"]
    k_units = [u for u, unit in enumerate(p.units) if unit.name == "model.layers.0.self_attn.k_proj.weight"]
    assert len(k_units) == kv_pieces
    for u in k_units:
        unit = p.units[u]
        assert unit.span == (unit.index * kv * hd // kv_pieces, (unit.index + 1) * kv * hd // kv_pieces)
        assert len(p.owners(u)) == tp // kv_pieces * 3
    # every TP rank's fused qkv weight: its q heads, then its kv heads' k and v
    specs = {s.name: s for s in p.specs}
    qkv = specs["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((16 // tp + 2 * kv // kv_pieces) * hd, cfg["hidden_size"])
    for tp_i in range(tp):
        rp = p.for_rank(layout.rank(tp=tp_i, dp=1))
        k = [r for r in rp.reads if r.tensor.name.endswith("0.self_attn.k_proj.weight")]
        v = [r for r in rp.reads if r.tensor.name.endswith("0.self_attn.v_proj.weight")]
        piece = tp_i * kv_pieces // tp
        assert [p.units[r.unit].index for r in k + v] == [piece, piece]
        assert k[0].dest == (16 // tp * hd, 16 // tp * hd + kv // kv_pieces * hd)
        assert v[0].dest == (k[0].dest[1], qkv.shape[0])
        assert_reads_fill_parameters(p, rp, specs)


def test_kv_heads_that_do_not_fit_tp_are_refused():
    with pytest.raises(PlanError, match="num_key_value_heads=3 does not fit tp=2"):
        build_model(llama_config(num_attention_heads=6, num_key_value_heads=3, head_dim=16), tp=2)


def test_q_k_v_and_gate_up_are_separate_units_of_one_fused_parameter():
    p = llama_plan(llama_config(), Layout(world_size=2, tp=2))
    params = collections.defaultdict(set)
    for unit in p.units:
        params[unit.param].add(unit.name)
    assert params["model.layers.1.self_attn.qkv_proj.weight"] == {
        f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv"}
    assert params["model.layers.1.mlp.gate_up_proj.weight"] == {
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}


def test_tied_head_verifies_a_saved_lm_head_and_needs_none():
    cfg = llama_config(tie_word_embeddings=True, vocab_size=999)
    layout = Layout(world_size=4, tp=4)
    specs = llama_specs(cfg, 4)
    head = next(s for s in specs if s.name == "lm_head.weight")
    assert head.role is Role.DERIVED and head.derived_from == ("model.embed_tokens.weight",)
    # without lm_head.weight: no unit, nothing unexpected
    p = plan(tensor_infos(hf_shapes(cfg)), specs, layout)
    assert not [u for u in p.units if u.name == "lm_head.weight"] and not p.unexpected
    # with it: verify units, read (never written) by their owners, not unexpected
    shapes = {**hf_shapes(cfg), "lm_head.weight": (999, cfg["hidden_size"])}
    p = plan(tensor_infos(shapes), specs, layout)
    units = [u for u, unit in enumerate(p.units) if unit.name == "lm_head.weight"]
    assert len(units) == 4 and all(p.units[u].verify and p.units[u].role is Role.REQUIRED for u in units)
    assert not p.unexpected
    for rank in range(4):
        rp = p.for_rank(rank)
        reads = [r for r in rp.reads if r.tensor.name == "lm_head.weight"]
        assert len(reads) == 1 and reads[0].verify and reads[0].param == "lm_head.weight"
        assert reads[0].unit in rp.owned


def test_absent_tensor_is_owned_but_not_read():
    layout = Layout(world_size=8, tp=4, dp=2)
    p = llama_plan(llama_config(), layout, drop=["model.layers.1.mlp.up_proj.weight"])
    ups = [u for u, unit in enumerate(p.units) if unit.name == "model.layers.1.mlp.up_proj.weight"]
    assert len(ups) == 4
    for rank in range(8):
        rp = p.for_rank(rank)
        mine = [u for u in ups if u in rp.owned]
        assert mine == [ups[layout.coords(rank).tp]]
        assert not [r for r in rp.reads if r.unit in ups]


def test_unit_table_is_rank_independent():
    """Every rank builds its own model (its own tp_rank) and must derive the same table."""
    cfg = llama_config(vocab_size=1001)
    layout = Layout(world_size=8, tp=8)
    infos = tensor_infos(hf_shapes(cfg))
    tables = {plan(infos, collect(cfg, 8, t), layout).units for t in range(8)}
    assert len(tables) == 1


def collect(cfg, tp, tp_rank):
    from distload.spec import collect_specs
    return collect_specs(build_model(cfg, tp=tp, tp_rank=tp_rank, device="meta"))


# ---- unexpected and ignored --------------------------------------------------------------------


def test_rotary_inv_freq_is_ignored_by_default_and_others_are_unexpected():
    cfg = llama_config()
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": (8,), "model.layers.1.self_attn.rotary_emb.inv_freq": (8,),
             "model.extra_head.weight": (4, 4), "model.layers.0.mlp.gate_proj.bias": (512,)}
    p = llama_plan(cfg, Layout(world_size=2, tp=2), extra=extra)
    assert p.ignored == ("model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq")
    assert p.unexpected == ("model.extra_head.weight", "model.layers.0.mlp.gate_proj.bias")
    assert DEFAULT_IGNORE  # documented default rules exist
    # the rule is anchored on a dotted component, not a substring
    p = llama_plan(cfg, Layout(world_size=1), extra={"model.my_rotary_emb.inv_freq": (8,)})
    assert p.unexpected == ("model.my_rotary_emb.inv_freq",)


def test_ignore_regex_moves_tensors_from_unexpected_to_ignored():
    extra = {"model.extra_head.weight": (4, 4), "model.extra_head.bias": (4,), "vision.proj": (3,)}
    p = llama_plan(llama_config(), Layout(world_size=1), extra=extra, ignore=[r"^model\.extra_head\."])
    assert p.ignored == ("model.extra_head.bias", "model.extra_head.weight")
    assert p.unexpected == ("vision.proj",)
    # ignore rules never hide a tensor that a parameter consumes
    p = llama_plan(llama_config(), Layout(world_size=1), ignore=[r".*"])
    assert p.ignored == () and p.unexpected == ()
    assert {u.name for u in p.units} == set(hf_shapes(llama_config()))


# ---- errors ------------------------------------------------------------------------------------


def test_shape_mismatch_names_tensor_file_and_parameter():
    cfg = llama_config()
    shapes = hf_shapes(cfg)
    shapes["model.layers.1.self_attn.k_proj.weight"] = (64, 256)
    infos = tensor_infos(shapes)
    with pytest.raises(PlanError) as info:
        plan(infos, llama_specs(cfg, 2), Layout(world_size=2, tp=2))
    err = info.value
    assert err.tensor == "model.layers.1.self_attn.k_proj.weight"
    assert err.file == infos["model.layers.1.self_attn.k_proj.weight"].file
    msg = str(err)
    assert "checkpoint shape [64, 256] differs from the model's [128, 256]" in msg
    assert "model.layers.1.self_attn.qkv_proj.weight" in msg and err.file in msg and err.tensor in msg


def w_info(name: str, shape: tuple[int, ...]) -> dict[str, TensorInfo]:
    return {name: TensorInfo(name=name, file="/x/a.safetensors", dtype=torch.float32, shape=shape,
                             begin=100, end=100 + 4 * math.prod(shape))}


def test_non_divisible_dim_names_the_tensor():
    spec = ParamSpec(name="blk.w", shape=(2, 4), sources=(Source(name="ck.w", shape=(10, 4),
                                                                 shard=Shard(dim=0, num_shards=4)),))
    with pytest.raises(PlanError) as info:
        plan(w_info("ck.w", (10, 4)), [spec], Layout(world_size=4, tp=4))
    assert info.value.tensor == "ck.w"
    assert "dim 0 of size 10 does not split into 4 pieces for tp=4" in str(info.value)
    assert "ck.w" in str(info.value)


def test_pieces_that_do_not_spread_over_tp_name_tensor_and_parameter():
    spec = ParamSpec(name="blk.w", shape=(4, 4), sources=(Source(name="ck.w", shape=(12, 4),
                                                                 shard=Shard(dim=0, num_shards=3)),))
    with pytest.raises(PlanError) as info:
        plan(w_info("ck.w", (12, 4)), [spec], Layout(world_size=4, tp=4))
    assert info.value.tensor == "ck.w"
    assert "3 pieces do not spread over tp=4 (parameter blk.w)" in str(info.value)


@pytest.mark.parametrize("field, value", [("intermediate_size", 500), ("num_attention_heads", 12)])
def test_model_sizes_that_do_not_split_name_the_config_field(field, value):
    cfg = llama_config(**{field: value})
    if field == "num_attention_heads":
        cfg["num_key_value_heads"] = 4
    with pytest.raises(PlanError, match=f"{field}={value} is not divisible by tp=8"):
        build_model(cfg, tp=8)


def test_tensor_feeding_two_parameters_is_refused():
    src = Source(name="shared.w", shape=(4, 4))
    specs = [ParamSpec(name="a.w", shape=(4, 4), sources=(src,)), ParamSpec(name="b.w", shape=(4, 4), sources=(src,))]
    with pytest.raises(PlanError) as info:
        plan(w_info("shared.w", (4, 4)), specs, Layout(world_size=1))
    assert info.value.tensor == "shared.w"
    assert "checkpoint tensor feeds two parameters, a.w and b.w" in str(info.value)


def test_tiling_gaps_overlaps_and_short_covers_are_refused():
    def spec(offsets, rows=8):
        return ParamSpec(name="fused.w", shape=(rows, 4), sources=tuple(
            Source(name=f"part{i}.w", shape=(8, 4), offset=o, shard=Shard(dim=0, num_shards=2))
            for i, o in enumerate(offsets)))

    check_tiling(spec([0, 4]), 2, tp_ranks=range(2))
    with pytest.raises(PlanError, match="parameter fused.w on TP rank 0: source part1.w starts at 5"):
        check_tiling(spec([0, 5]), 2)
    with pytest.raises(PlanError, match="source part1.w starts at 3 along dim 0, expected 4"):
        check_tiling(spec([0, 3]), 2)
    with pytest.raises(PlanError, match="sources cover 8 of 10 along dim 0"):
        check_tiling(spec([0, 4], rows=10), 2)
    with pytest.raises(PlanError, match="replicated parameter r.w of shape \\(4,\\) needs exactly one source"):
        check_tiling(ParamSpec(name="r.w", shape=(4,), sources=(Source(name="r.w", shape=(5,)),)), 1)
    with pytest.raises(PlanError, match="sources of m.w are cut along different dims"):
        check_tiling(ParamSpec(name="m.w", shape=(4, 4), sources=(
            Source(name="a", shape=(4, 4), shard=Shard(dim=0, num_shards=1)),
            Source(name="b", shape=(4, 4), shard=Shard(dim=1, num_shards=1), offset=4))), 1)
    with pytest.raises(PlanError, match="source a of shape \\(4, 3\\) does not fit parameter m.w"):
        check_tiling(ParamSpec(name="m.w", shape=(4, 4), sources=(
            Source(name="a", shape=(4, 3), shard=Shard(dim=0, num_shards=1)),)), 1)


def test_planning_checks_tiling_of_every_spec():
    bad = ParamSpec(name="fused.w", shape=(8, 4), sources=(
        Source(name="p0", shape=(8, 4), shard=Shard(dim=0, num_shards=2)),
        Source(name="p1", shape=(8, 4), offset=2, shard=Shard(dim=0, num_shards=2))))
    with pytest.raises(PlanError, match="fused.w"):
        plan({}, [bad], Layout(world_size=2, tp=2))


# Phi-3-shaped: fused qkv_proj [(64 + 2 x 8) heads x 8, 512] and gate_up_proj [2 x 1408, 512] on disk
PHI3_CFG = {**BIG_CFG, "model_type": "phi3"}


def phi3_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """A Phi-3 checkpoint's names and shapes: Llama's, with q/k/v and gate/up fused."""
    shapes = hf_shapes({**cfg, "model_type": "llama"})
    heads, kv, hd, h, inter = (cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                "hidden_size", "intermediate_size"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            del shapes[f"{p}{part}.weight"]
        shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * hd, h)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
    return shapes


@pytest.mark.parametrize("layout", BIG_LAYOUTS.values(), ids=BIG_LAYOUTS.keys())
def test_fused_regions_are_read_by_exactly_their_owners_at_4096_ranks(layout):
    cfg, tp = PHI3_CFG, layout.tp
    infos = tensor_infos(phi3_shapes(cfg))
    p = plan(infos, llama_specs(cfg, tp), layout)
    assert not p.unexpected
    heads, kv, hd, h, inter = 64, 8, 8, 512, 1408
    row = h * infos["model.layers.0.self_attn.qkv_proj.weight"].itemsize  # bytes of one row
    qkv, gu = infos["model.layers.0.self_attn.qkv_proj.weight"], infos["model.layers.0.mlp.gate_up_proj.weight"]

    def rows(info, first: int, count: int) -> tuple[int, int]:
        return info.begin + first * row, info.begin + (first + count) * row

    q_rows, kv_rows = heads * hd // tp, kv * hd // min(tp, kv)
    expected = {}  # tp index -> the byte ranges of its q, k, v, gate and up regions, by hand
    for t in range(tp):
        j = t * kv // tp  # the KV piece of TP rank t (replicated when tp exceeds the KV heads)
        expected[t] = {rows(qkv, t * q_rows, q_rows), rows(qkv, heads * hd + j * kv_rows, kv_rows),
                       rows(qkv, (heads + kv) * hd + j * kv_rows, kv_rows),
                       rows(gu, t * inter // tp, inter // tp), rows(gu, inter + t * inter // tp, inter // tp)}
    readers = collections.Counter()
    for rank in range(layout.world_size):
        got = {iv for r in p.for_rank(rank).reads if r.tensor in (qkv, gu) for iv in intervals(r)}
        assert got == expected[layout.coords(rank).tp], f"rank {rank}"
        readers.update(r.unit for r in p.for_rank(rank).reads if r.tensor in (qkv, gu))
    # five regions per fused pair, each cut per TP piece: every unit read by each of its owners, once
    fused = [i for i, u in enumerate(p.units) if u.name in (qkv.name, gu.name)]
    assert len(fused) == tp + 2 * min(tp, kv) + 2 * tp
    assert {p.units[i].label.rpartition("[")[2] for i in fused} == {"q]", "k]", "v]", "gate]", "up]"}
    for i in fused:
        assert readers[i] == p.num_owners(i) == len(p.owners(i)), p.units[i].label
    k_units = [i for i in fused if p.units[i].region.label == "k"]
    assert sum(p.num_owners(i) for i in k_units) == layout.world_size  # each rank owns one k piece


def test_a_fused_tensor_of_the_wrong_shape_is_checked_once_and_named():
    cfg = {**llama_config(), "model_type": "phi3"}
    shapes = phi3_shapes(cfg)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    shapes[name] = (shapes[name][0] - 16, 256)  # one KV head too few
    with pytest.raises(PlanError) as info:
        plan(tensor_infos(shapes), llama_specs(cfg, 2), Layout(world_size=2, tp=2))
    assert info.value.tensor == name
    assert info.value.message == f"checkpoint shape [496, 256] differs from the model's [512, 256] (parameter {name})"


def _region_spec(name: str, *boxes: tuple[int, int], full: tuple[int, ...] = (8, 4)) -> ParamSpec:
    from distload.spec import Region
    sources, offset = [], 0
    for start, stop in boxes:
        region = Region(tensor_shape=full, dim=0, start=start, stop=stop, label=f"r{start}")
        sources.append(Source(name=name, shape=region.shape, offset=offset, region=region,
                              shard=Shard(dim=0, num_shards=1)))
        offset += stop - start
    return ParamSpec(name=f"p{boxes[0][0]}", shape=(offset, full[1]), sources=tuple(sources))


def test_a_region_outside_its_tensor_is_a_plan_error_naming_it():
    with pytest.raises(PlanError) as info:
        plan(w_info("w", (8, 4)), [_region_spec("w", (6, 10), full=(8, 4))], Layout(world_size=1))
    assert info.value.tensor == "w"
    assert info.value.message == ("region r6 of parameter p6: range [6, 10) along dim 0 is outside the "
                                  "tensor's shape [8, 4]")


def test_overlapping_regions_and_a_region_beside_the_whole_tensor_are_refused():
    layout = Layout(world_size=1)
    with pytest.raises(PlanError, match="regions of parameters p0 and p3 overlap"):
        plan(w_info("w", (8, 4)), [_region_spec("w", (0, 4)), _region_spec("w", (3, 8))], layout)
    whole = ParamSpec(name="whole", shape=(8, 4), sources=(Source(name="w", shape=(8, 4)),))
    with pytest.raises(PlanError, match="feeds two parameters, whole and p0"):
        plan(w_info("w", (8, 4)), [_region_spec("w", (0, 4)), whole], layout)
    # disjoint regions of one tensor, feeding two parameters: two units, each read from its start
    p = plan(w_info("w", (8, 4)), [_region_spec("w", (0, 3)), _region_spec("w", (3, 8))], layout)
    reads = sorted(p.for_rank(0).reads, key=lambda r: r.offset)
    info = p.tensors["w"]
    assert [(r.param, r.offset - info.begin, r.run, r.shape) for r in reads] == [
        ("p0", 0, 3 * 16, (3, 4)), ("p3", 3 * 16, 5 * 16, (5, 4))]


# gpt-oss- / Llama-4-shaped packed experts at 4,096 ranks: 64 experts, each also copied once
# (128 slots, 2 per group of 64 ranks), every expert's I = 512 columns cut over expert tp 64
PACKED_LAYOUT = Layout(world_size=4096, tp=8, dp=512, ep=64)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_packed_experts_are_read_by_exactly_their_hosts_at_4096_ranks(interleaved):
    from distload.experts import ExpertPlacement
    from distload.layers.packed_moe import PackedExperts, silu_glu

    e, h, i, layout = 64, 16, 512, PACKED_LAYOUT
    placement = ExpertPlacement.make(num_experts=e, ep=layout.ep, redundant=e)
    etp = layout.expert_tp
    experts = PackedExperts(h, i, placement, group=0, shard=0, etp=etp, interleaved=interleaved, glu=silu_glu,
                            bias=interleaved, device="meta")
    specs = tuple(experts.param_specs("mlp.experts"))
    shapes = {"mlp.experts.gate_up_proj": (e, h, 2 * i), "mlp.experts.down_proj": (e, i, h)}
    if interleaved:
        shapes.update({"mlp.experts.gate_up_proj_bias": (e, 2 * i), "mlp.experts.down_proj_bias": (e, h)})
    infos = tensor_infos(shapes)
    p = plan(infos, specs, layout)
    assert not p.unexpected
    gate_up, down = infos["mlp.experts.gate_up_proj"], infos["mlp.experts.down_proj"]
    cols, rows = 2 * i // etp, i // etp  # a shard's columns of gate_up (of each half: rows), rows of down

    def mine(group: int, shard: int) -> set[tuple[int, int]]:
        """The byte ranges of gate_up and down a holder of shard ``shard`` of ``group``'s experts reads."""
        out = set()
        for x in (placement.slots[s] for s in placement.group_slots(group)):
            for r in range(h):
                row = gate_up.begin + 2 * (x * h + r) * 2 * i  # bf16: 2 bytes an element
                if interleaved:  # one range holding its gate and up columns
                    out.add((row + 2 * shard * cols, row + 2 * (shard + 1) * cols))
                else:  # its range of the gate half, and of the up half
                    out |= {(row + 2 * (k * i + shard * rows), row + 2 * (k * i + (shard + 1) * rows)) for k in (0, 1)}
            out.add((down.begin + 2 * (x * i + shard * rows) * h, down.begin + 2 * (x * i + (shard + 1) * rows) * h))
        return out

    readers = collections.Counter()
    for rank in range(layout.world_size):
        reads = [r for r in p.for_rank(rank).reads if r.tensor in (gate_up, down)]
        assert {iv for r in reads for iv in intervals(r)} == mine(*layout.expert_coords(rank)), f"rank {rank}"
        readers.update(r.unit for r in p.for_rank(rank).reads)
    # a unit per expert per shard (per half), each read by the two ranks holding its copies
    assert len(p.units) == e * (3 * etp + (1 if interleaved else 0))  # + the down bias, whole per expert
    for u in range(len(p.units)):
        assert readers[u] == p.num_owners(u) == len(p.owners(u)) == 2 * (etp // p.units[u].num_shards)
    labels = {p.units[u].label for u in range(len(p.units)) if p.units[u].name == gate_up.name}
    assert labels == ({f"{gate_up.name}[{x}]" for x in range(e)} if interleaved else
                      {f"{gate_up.name}[{x}.{k}]" for x in range(e) for k in ("gate", "up")})


def test_a_packed_tensor_read_whole_by_another_parameter_is_refused():
    from distload.experts import ExpertPlacement
    from distload.layers.packed_moe import PackedExperts, silu_glu

    placement = ExpertPlacement.make(num_experts=4, ep=1)
    specs = tuple(PackedExperts(8, 16, placement, group=0, shard=0, etp=1, interleaved=True, glu=silu_glu,
                                device="meta").param_specs("x"))
    whole = ParamSpec(name="y", shape=(4, 16, 8), sources=(Source(name="x.down_proj", shape=(4, 16, 8)),))
    shapes = {"x.gate_up_proj": (4, 8, 32), "x.down_proj": (4, 16, 8)}
    with pytest.raises(PlanError, match="feeds two parameters, y and x.down_proj"):
        plan(tensor_infos(shapes), (*specs, whole), Layout(world_size=1))
