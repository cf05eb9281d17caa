"""Layout: validation messages and the rank <-> coordinates mapping (pure, no processes)."""

import itertools

import pytest

from distload.errors import LayoutError
from distload.layout import Coords, Layout

LAYOUTS = [
    dict(world_size=1),
    dict(world_size=8, tp=8),
    dict(world_size=8, tp=2, dp=4),
    dict(world_size=12, tp=2, dp=3, pp=2),
    dict(world_size=24, tp=4, dp=3, pp=2),
    dict(world_size=4096, tp=8, dp=512),
    dict(world_size=4096, tp=64, dp=64),
    dict(world_size=4096, tp=8, dp=64, pp=8),
]


@pytest.mark.parametrize("axis", ["world_size", "tp", "dp", "pp"])
@pytest.mark.parametrize("value", [0, -2, True, 2.0, "2"])
def test_non_positive_or_non_integer_axis_is_refused_by_name(axis, value):
    kwargs = dict(world_size=4, tp=2, dp=2, pp=1)
    kwargs[axis] = value
    with pytest.raises(LayoutError) as info:
        Layout(**kwargs)
    assert str(info.value) == f"layout {axis} must be a positive integer, got {value!r}"


def test_product_not_equal_to_world_names_every_axis_and_the_world():
    with pytest.raises(LayoutError) as info:
        Layout(world_size=8, tp=3, dp=2)
    msg = str(info.value)
    assert "tp=3 x dp=2 x pp=1 = 6" in msg
    assert "world size is 8" in msg
    assert "whose product is 8" in msg


def test_for_world_derives_dp():
    assert Layout.for_world(8, tp=2) == Layout(world_size=8, tp=2, dp=4)
    assert Layout.for_world(4096, tp=8) == Layout(world_size=4096, tp=8, dp=512)
    assert Layout.for_world(12, tp=2, pp=3).dp == 2
    assert Layout.for_world(8, tp=2, dp=4).dp == 4


@pytest.mark.parametrize("world, tp, pp", [(10, 4, 1), (12, 5, 1), (8, 2, 3), (4096, 3, 1)])
def test_for_world_with_non_divisible_world(world, tp, pp):
    with pytest.raises(LayoutError) as info:
        Layout.for_world(world, tp=tp, pp=pp)
    assert str(info.value) == (f"world size {world} is not divisible by tp={tp} x pp={pp}; "
                               f"choose tp and pp whose product divides {world}")


@pytest.mark.parametrize("kwargs, axis", [(dict(tp=0), "tp"), (dict(tp=-8), "tp"), (dict(pp=0), "pp"),
                                          (dict(tp="2"), "tp")])
def test_for_world_with_bad_axis_names_the_axis(kwargs, axis):
    with pytest.raises(LayoutError) as info:
        Layout.for_world(8, **kwargs)
    assert str(info.value).startswith(f"layout {axis} must be a positive integer")


def test_for_world_with_explicit_dp_still_checks_the_product():
    with pytest.raises(LayoutError, match="does not fill the world"):
        Layout.for_world(8, tp=2, dp=2)


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda k: "-".join(f"{a}{v}" for a, v in k.items()))
def test_coords_rank_round_trip_for_every_rank(kwargs):
    layout = Layout(**kwargs)
    seen = set()
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert 0 <= c.tp < layout.tp and 0 <= c.dp < layout.dp and 0 <= c.pp < layout.pp
        assert layout.rank(tp=c.tp, dp=c.dp, pp=c.pp) == rank
        # the documented formula, computed independently of the class
        assert rank == (c.pp * layout.dp + c.dp) * layout.tp + c.tp
        seen.add((c.tp, c.dp, c.pp))
    assert len(seen) == layout.world_size  # a bijection


def test_rank_order_is_tp_innermost_then_dp_then_pp():
    layout = Layout(world_size=12, tp=2, dp=3, pp=2)
    order = [layout.coords(r) for r in range(12)]
    expected = [Coords(tp=t, dp=d, pp=p) for p, d, t in itertools.product(range(2), range(3), range(2))]
    assert order == expected


def test_known_coordinates():
    layout = Layout(world_size=4096, tp=8, dp=64, pp=8)
    assert layout.coords(0) == Coords(tp=0, dp=0, pp=0)
    assert layout.coords(4095) == Coords(tp=7, dp=63, pp=7)
    assert layout.coords(8 * 64 * 3 + 8 * 5 + 6) == Coords(tp=6, dp=5, pp=3)
    assert layout.rank(tp=6, dp=5, pp=3) == 8 * 64 * 3 + 8 * 5 + 6


@pytest.mark.parametrize("rank", [-1, 8, 100])
def test_rank_outside_world_is_refused(rank):
    layout = Layout(world_size=8, tp=4, dp=2)
    with pytest.raises(LayoutError, match=f"rank {rank} is outside world size 8"):
        layout.coords(rank)
    with pytest.raises(LayoutError, match=f"rank {rank} is outside world size 8"):
        layout.tp_group(rank)


@pytest.mark.parametrize("coords", [dict(tp=4, dp=0), dict(tp=0, dp=2), dict(tp=0, dp=0, pp=1),
                                    dict(tp=-1, dp=0)])
def test_coordinates_outside_layout_are_refused(coords):
    layout = Layout(world_size=8, tp=4, dp=2)
    with pytest.raises(LayoutError, match="lie outside world=8 \\(tp=4, dp=2, pp=1, ep=1\\)"):
        layout.rank(**coords)


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda k: "-".join(f"{a}{v}" for a, v in k.items()))
def test_tp_groups_partition_the_world(kwargs):
    layout = Layout(**kwargs)
    groups = layout.tp_groups()
    assert len(groups) == layout.dp * layout.pp
    assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
    for group in groups:
        assert len(group) == layout.tp
        coords = [layout.coords(r) for r in group]
        assert [c.tp for c in coords] == list(range(layout.tp))  # in TP order
        assert len({(c.dp, c.pp) for c in coords}) == 1  # one replica of one stage
    # every rank's own group is the one listed for it
    for rank in range(0, layout.world_size, max(1, layout.world_size // 257)):
        group = layout.tp_group(rank)
        assert rank in group and group in groups


def test_tp_group_examples():
    layout = Layout(world_size=8, tp=4, dp=2)
    assert layout.tp_group(5) == (4, 5, 6, 7)
    assert layout.tp_group(0) == (0, 1, 2, 3)
    assert layout.tp_groups() == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert Layout(world_size=4, dp=4).tp_groups() == ((0,), (1,), (2,), (3,))


def test_ranks_where():
    layout = Layout(world_size=12, tp=2, dp=3, pp=2)
    assert layout.ranks_where(tp=1) == (1, 3, 5, 7, 9, 11)
    assert layout.ranks_where(pp=1) == (6, 7, 8, 9, 10, 11)
    assert layout.ranks_where(tp=0, pp=0) == (0, 2, 4)
    assert layout.ranks_where() == tuple(range(12))


def test_layout_is_frozen_and_describes_itself():
    layout = Layout(world_size=8, tp=2, dp=4)
    with pytest.raises(AttributeError):
        layout.tp = 4  # type: ignore[misc]
    assert layout.describe() == "world=8 (tp=2, dp=4, pp=1, ep=1)"
    assert layout.to_dict() == {"world_size": 8, "tp": 2, "dp": 4, "pp": 1, "ep": 1}


def test_a_layout_larger_than_the_world_says_how_to_get_the_ranks():
    with pytest.raises(LayoutError) as info:
        Layout.for_world(1, tp=2, pp=2)
    assert str(info.value) == ("tp=2 x pp=2 needs 4 ranks, but the world has 1: start 4 (torchrun --nproc-per-node 4 "
                               "-m distload ...), or plan the layout without them: python -m distload CHECKPOINT "
                               "--dry-run --world 4 ...")
