"""``distload.track``'s keys, expectations built from vLLM-shaped metadata, and the recorder: what
counts is what a loader *wrote* into a parameter, found from the piece of the checkpoint tensor
it copied, not what it was called with."""

from __future__ import annotations

import pytest
import torch

from distload.errors import PlanError
from distload.spec import Region
from distload.track import Expectations, Key, Recorder, from_engine
from distload.track.keys import covers
from distload.track.slices import index_box


def frozen(*shape) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(*shape), requires_grad=False)


def record(expected: list[Key], params: dict, load, weights: dict) -> Recorder:
    """Runs ``load(name, tensor)`` over ``weights`` under a recorder of ``expected``."""
    exp = Expectations()
    for k in expected:
        exp.expect(k, param="p")
    rec = Recorder(exp, params)
    with rec.observe():
        for name, tensor in rec.weights(weights.items()):
            load(name, tensor)
    return rec


def test_a_narrowed_copy_records_exactly_the_piece_it_copied():
    p = frozen(4, 8)
    pieces = [Key.of("w", dim=0, index=i, num_shards=2) for i in range(2)]
    rec = record(pieces, {"p": p}, lambda n, t: p.data.copy_(t.narrow(0, 4, 4)), {"w": torch.ones(8, 8)})
    assert rec.loaded() == (pieces[1],) and rec.consumed == {"w"}
    rec = record(pieces, {"p": p}, lambda n, t: p.data[:, :4].copy_(t[4:, :4]), {"w": torch.ones(8, 8)})
    assert rec.loaded() == ()  # half of piece 1 only
    col = frozen(8, 2)
    piece = Key.of("w", dim=1, index=1, num_shards=4)
    rec = record([piece], {"col": col}, lambda n, t: col.data.copy_(t[:, 2:4].double()), {"w": torch.ones(8, 8)})
    assert rec.loaded() == (piece,)  # copied from a cast of its piece
    rec = record([piece], {"col": col}, lambda n, t: col.data.copy_(t[:, 0:2].double()), {"w": torch.ones(8, 8)})
    assert rec.loaded() == ()  # a cast of another rank's columns
    rec = record([piece], {"col": col}, lambda n, t: col.data.copy_(t[:, 2:4] * 2), {"w": torch.ones(8, 8)})
    assert rec.loaded() == ()  # computed from the tensor: which piece is unknown, and this key is one piece
    assert record([piece], {"col": col}, lambda n, t: col.data.copy_(t[:, 2:4]), {"w": torch.ones(8, 8)}).loaded() \
        == (piece,)
    assert record([piece], {"col": col}, lambda n, t: col.data.copy_(t[:, 4:6]), {"w": torch.ones(8, 8)}).loaded() \
        == ()  # another rank's columns


def test_an_expert_loader_called_for_a_non_local_expert_writes_nothing():
    w13 = frozen(2, 8, 4)  # two local experts, gate and up of width 4 stacked
    expert_map = [-1, 0, -1, 1]  # this rank hosts physical experts 1 and 3

    def weight_loader(param, loaded_weight, shard_id, expert_id):
        local = expert_map[expert_id]
        if local < 0:
            return  # called on every rank, writes only where the expert lives
        rows = slice(0, 4) if shard_id == "w1" else slice(4, 8)
        param.data[local][rows] = loaded_weight

    keys = [Key.of(f"e.{e}.up") for e in range(4)]
    rec = record(keys, {"w13": w13}, lambda n, t: weight_loader(w13, t, "w3", int(n.split(".")[1])),
                 {f"e.{e}.up": torch.ones(4, 4) for e in range(4)})
    assert rec.loaded() == (keys[1], keys[3]) and rec.consumed == {"e.1.up", "e.3.up"}


def test_two_local_copies_need_two_writes():
    exp = Expectations()
    key = Key.of("e.1.up")
    exp.expect(key, param="w13")
    exp.expect(key, param="w13")  # a redundant copy hosted on the same rank
    assert exp.entries()[0].copies == 2
    rec = Recorder(exp, {})
    rec.mark(key)
    assert rec.loaded() == ()
    rec.mark(key)
    assert rec.loaded() == (key,)
    with pytest.raises(PlanError, match=r"e.1.up is declared required for w13 and optional for x"):
        exp.expect(key, param="x", optional=1.0)


def test_fused_on_disk_regions_are_told_apart_by_the_rows_copied():
    qkv = frozen(12, 4)
    region = {part: Region(tensor_shape=(24, 4), dim=0, start=a, stop=b, label=part)
              for part, (a, b) in {"q": (0, 16), "k": (16, 20), "v": (20, 24)}.items()}
    keys = {part: Key.of("qkv", dim=0, index=0, num_shards=2, region=r) for part, r in region.items()}

    def load_q_and_v(name, t):  # TP rank 0 of 2: q rows 0-7, v rows 20-21; k forgotten
        qkv.data[0:8].copy_(t[0:8])
        qkv.data[10:12].copy_(t[20:22])

    rec = record(list(keys.values()), {"qkv": qkv}, load_q_and_v, {"qkv": torch.ones(24, 4)})
    assert rec.loaded() == (keys["q"], keys["v"])
    assert keys["k"].label == "qkv[k]" and keys["k"].box((24, 4)) == ((16, 18), (0, 4))


def test_a_replaced_parameter_and_a_scalar_scale_count_as_written():
    p, s = frozen(4), frozen(())
    keys = [Key.of("p"), Key.of("s")]

    def load(name, t):
        if name == "p":
            p.data = t
        else:
            s.data.copy_(t)

    rec = record(keys, {"p": p, "s": s}, load, {"p": torch.ones(4), "s": torch.tensor(2.0)})
    assert rec.loaded() == tuple(keys)


def test_tracking_off_observes_nothing():
    p = frozen(4)
    exp = Expectations()
    exp.expect(Key.of("p"), param="p")
    rec = Recorder(exp, {"p": p}, enabled=False)
    with rec.observe():
        for _, t in rec.weights([("p", torch.ones(4))]):
            p.data.copy_(t)
    assert rec.loaded() == () and rec.seen == set()


def test_boxes_cover_and_indices_are_boxes():
    assert covers(((0, 4), (0, 4)), [((0, 4), (0, 2)), ((0, 2), (2, 4)), ((2, 4), (2, 4))])
    assert not covers(((0, 4), (0, 4)), [((0, 4), (0, 2)), ((0, 2), (2, 4))])
    assert index_box((slice(None), 3), (2, 8)) == ((0, 2), (3, 4))
    assert index_box((slice(0, 8, 2),), (8,)) is None
    assert Key.of("w", dim=0, index=3, num_shards=4, pad=True).box((10, 2)) == ((9, 10), (0, 2))
    with pytest.raises(PlanError, match="a whole-tensor key has one piece, got piece 1 of 2"):
        Key.of("w", index=1, num_shards=2)


STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
# FusedMoE.make_expert_params_mapping with 4 experts and 2 redundant: physical 4, 5 hold experts 0, 1
EXPERTS = [("experts.w13_" if w in ("gate_proj", "up_proj") else "experts.w2_",
            f"experts.{[0, 1, 2, 3, 0, 1][p]}.{w}.", p, shard)
           for p in range(6) for shard, w in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))]


def test_expectations_from_stacked_and_expert_mappings():
    params = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.attn.k_scale",
              "model.layers.1.mlp.experts.w13_weight", "model.layers.1.mlp.experts.w2_weight",
              "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate_up_proj.weight_scale_inv",
              "lm_head.weight", "model.layers.2.input_layernorm.weight"]
    seen = []

    def piece_of(param, name, shard_id):
        seen.append((param, name, shard_id))
        return Key.of(name, dim=0, index=1, num_shards=2) if shard_id in ("q", "k", "v", 0, 1) else Key.of(name)

    exp = from_engine(params, piece_of=piece_of, stacked=STACKED, experts=EXPERTS,
                      expert_maps={"model.layers.1.mlp.experts": [-1, 0, -1, -1, -1, 1]},  # physical 1 and 5
                      is_pp_missing=lambda n: n.startswith("model.layers.2."),
                      checkpoint_name=lambda n: n.replace(".attn.k_scale", ".k_scale"),
                      optional={r"\.k_scale$": 1.0}, derived={"lm_head.weight": ["model.embed_tokens.weight"]})
    names = {e.key.name: e for e in exp.entries()}
    assert sorted(names) == sorted([
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.k_scale",
        "model.layers.1.mlp.experts.1.gate_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight",
        "model.layers.1.mlp.experts.1.down_proj.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate_proj.weight_scale_inv", "model.layers.1.mlp.up_proj.weight_scale_inv"])
    assert names["model.layers.1.mlp.experts.1.up_proj.weight"].copies == 2  # physical 1 and its copy 5
    assert names["model.layers.0.self_attn.k_scale"].default == 1.0
    assert exp.derived == {"lm_head.weight": ("model.embed_tokens.weight",)}
    assert ("model.layers.1.mlp.experts.w13_weight", "model.layers.1.mlp.experts.1.up_proj.weight", "w3") in seen
