"""Expert placement, expert-parallel layouts and expert units, planned for thousands of ranks."""

from __future__ import annotations

import pytest

from distload.errors import LayoutError
from distload.experts import ExpertPlacement, parse_expert_map
from distload.layout import Layout
from tests.synthetic import reference_plan

MIXTRAL = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 1024,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 16,
           "num_experts_per_tok": 2}


def test_linear_and_round_robin_slots():
    lin = ExpertPlacement.make(num_experts=8, ep=4)
    assert [lin.group_slots(g) for g in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    rr = ExpertPlacement.make(num_experts=8, ep=4, kind="round_robin")
    assert [rr.group_slots(g) for g in range(4)] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    red = ExpertPlacement.make(num_experts=6, ep=4, redundant=2)
    assert red.slots == (0, 1, 2, 3, 4, 5, 0, 1) and red.groups_of(0) == (0, 3) and red.groups_of(1) == (0, 3)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_experts": 8, "ep": 3}, "do not divide over ep=3"),
    ({"num_experts": 8, "ep": 1, "redundant": 1}, "two copies in expert group 0"),
    ({"num_experts": 4, "ep": 2, "kind": "round_robin", "redundant": 2}, "two copies"),
    ({"num_experts": 4, "ep": 2, "kind": "striped"}, "unknown (known: linear, round_robin)"),
    ({"num_experts": 4, "ep": 2, "redundant": 2, "hot": (0, 9)}, "must be 2 experts in [0, 4)"),
])
def test_placement_errors_say_what_to_change(kwargs, message):
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ExpertPlacement.make(**kwargs)


def test_layout_expert_coordinates_cover_each_group_shard_once():
    for lay in (Layout(world_size=4096, tp=8, dp=512, ep=256), Layout(world_size=64, tp=4, dp=8, pp=2, ep=4),
                Layout(world_size=16, tp=4, dp=4)):
        seen: dict[tuple, list[int]] = {}
        for r in range(lay.world_size):
            seen.setdefault((lay.coords(r).pp, *lay.expert_coords(r)), []).append(r)
        for (pp, group, shard), ranks in seen.items():
            assert tuple(ranks) == lay.expert_ranks(group=group, shard=shard, pp=pp)
            assert len(ranks) == (lay.dp if lay.ep == 1 else 1)
        assert lay.expert_tp == (lay.tp if lay.ep == 1 else lay.dp * lay.tp // lay.ep)
    with pytest.raises(LayoutError, match="ep=3 does not divide the 8 ranks of a pipeline stage"):
        Layout(world_size=8, tp=2, dp=4, ep=3)


def _plan(layout: Layout, cfg=MIXTRAL, *, kind="linear", redundant=0, drop=()):
    return reference_plan(cfg, layout, kind=kind, redundant=redundant, drop=drop)


@pytest.mark.parametrize("layout,kind,redundant", [
    (Layout(world_size=4096, tp=1, dp=4096, ep=16), "linear", 0),
    (Layout(world_size=4096, tp=4, dp=1024, ep=8), "linear", 8),
    (Layout(world_size=64, tp=4, dp=16, ep=4), "round_robin", 0),
    (Layout(world_size=64, tp=4, dp=16), "linear", 0),
])
def test_expert_units_are_read_by_exactly_their_owners(layout, kind, redundant):
    p = _plan(layout, kind=kind, redundant=redundant)
    readers: dict[int, set[int]] = {}
    classes = {}
    for r in range(layout.world_size):  # ranks of one class read the same units
        key = p.rank_class(r)
        if key not in classes:
            classes[key] = {x.unit for x in p.for_rank(r).reads}
        for u in classes[key]:
            readers.setdefault(u, set()).add(r)
    expert_units = [u for u, unit in enumerate(p.units) if unit.expert is not None]
    assert expert_units
    for u in range(len(p.units)):
        assert readers[u] == set(p.owners(u)), p.units[u].name
        assert p.num_owners(u) == len(p.owners(u))


def test_a_rank_reads_no_byte_of_a_non_local_expert():
    layout = Layout(world_size=8, tp=1, dp=8, ep=8)
    p = _plan(layout)
    for r in range(8):
        group, _ = layout.expert_coords(r)
        local = {p.units[0].placement.slots[s] for s in ExpertPlacement.make(num_experts=16, ep=8).group_slots(group)} \
            if p.units[0].placement else set(range(2 * group, 2 * group + 2))
        for read in p.for_rank(r).reads:
            if ".experts." in read.tensor.name:
                assert int(read.tensor.name.split(".experts.")[1].split(".")[0]) in local


def test_a_deleted_expert_is_owned_by_its_hosts_only():
    layout = Layout(world_size=16, tp=2, dp=8, ep=4)  # expert tp = 4, 4 experts per group
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    p = _plan(layout, drop=[name])
    units = [u for u, unit in enumerate(p.units) if unit.name == name]
    owners = sorted({r for u in units for r in p.owners(u)})
    assert owners == [4, 5, 6, 7]  # expert 5 lives in group 1: ranks 4..7 of the stage


def test_expert_map_parsing():
    doc = {"layers": {"default": {"0": [0, 5], "1": [1], "2": [2], "3": [3, 4]}, "1": {"0": [0], "1": [1],
                                                                                         "2": [2], "3": [3]}}}
    parsed = parse_expert_map(doc, num_experts=4, num_layers=2)
    assert parsed == {-1: (0, 1, 2, 3, 3, 0), 1: (0, 1, 2, 3)}
    for bad, message in [({"layers": {"0": {"0": [0], "1": [2]}}}, "experts \\[2, 3\\] have no slot"),
                         ({"layers": {"default": {"0": [0], "1": [0], "2": [1], "3": [2]}}}, "slot 0 is given"),
                         ({"layers": {"7": {}}}, "layer key '7'"),
                         ({"layers": {"0": {"0": [0], "1": [1], "2": [2], "3": [5]}}}, "slots must be 0..3"),
                         ([], "expected")]:
        with pytest.raises(LayoutError, match=message):
            parse_expert_map(bad, num_experts=4, num_layers=2, path="map.json")
