"""Test layouts and the rank arithmetic written by hand for them (rank -> coordinates, hosted
experts, pipeline stage of a layer), shared by the multi-rank checkpoint tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class L:
    """One layout to test: world = tp x dp x pp."""

    model: str
    world: int
    tp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    placement: str = "linear"
    redundant: int = 0

    def __post_init__(self) -> None:
        assert self.tp * self.dp * self.pp == self.world

    def options(self) -> dict:
        return {"tp": self.tp, "dp": self.dp, "pp": self.pp, "ep": self.ep, "expert_placement": self.placement,
                "redundant_experts": self.redundant}

    @property
    def id(self) -> str:
        extra = (f"-{self.placement}" if self.ep > 1 else "") + (f"-r{self.redundant}" if self.redundant else "")
        return f"{self.model}-w{self.world}-tp{self.tp}-dp{self.dp}-pp{self.pp}-ep{self.ep}{extra}"


def stage_of_layer(m, lay: L, layer: int) -> int:
    """The pipeline stage holding ``layer`` (``m.num_layers`` split as evenly as can be, the first stages longer)."""
    per = [m.num_layers // lay.pp + (s < m.num_layers % lay.pp) for s in range(lay.pp)]
    return next(s for s in range(lay.pp) if sum(per[:s]) <= layer < sum(per[:s + 1]))


def coords(lay: L, rank: int) -> tuple[int, int, int]:
    """(tp_i, dp_i, pp_i) of ``rank = (pp_i * dp + dp_i) * tp + tp_i``."""
    return rank % lay.tp, (rank // lay.tp) % lay.dp, rank // (lay.tp * lay.dp)


def hosted(m, lay: L, rank: int, slots: list[int] | None = None) -> tuple[list[int], int, int]:
    """Returns (the logical expert of each local slot, this rank's shard index, expert tp).

    Slots 0..E-1 hold experts 0..E-1 and slots E..E+R-1 the first R experts again (``slots``, an
    expert map's slot -> expert list, replaces that); linear placement gives group g the slots
    [g S/ep, (g+1) S/ep), round robin the slots s = g mod ep. With ep = 1 every replica is one
    group of tp ranks; with ep > 1 the group is the stage-local index (dp_i tp + tp_i) // expert_tp.
    """
    tp_i, dp_i, _ = coords(lay, rank)
    if slots is None:
        slots = list(range(m.num_experts)) + list(range(lay.redundant))
    if lay.ep == 1:
        group, shard, etp = 0, tp_i, lay.tp
    else:
        etp = lay.dp * lay.tp // lay.ep
        group, shard = divmod(dp_i * lay.tp + tp_i, etp)
    per = len(slots) // lay.ep
    mine = (range(group * per, (group + 1) * per) if lay.placement == "linear"
            else range(group, len(slots), lay.ep))
    return [slots[s] for s in mine], shard, etp
