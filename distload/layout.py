"""The parallel layout: world size split into tensor, data and pipeline parallel axes.

Rank order, used everywhere and computed only here: TP innermost, then DP, then
PP outermost, ``rank = (pp_i * dp + dp_i) * tp + tp_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LayoutError


@dataclass(frozen=True, kw_only=True, slots=True)
class Coords:
    """One rank's position on each axis."""

    tp: int
    """index within its tensor-parallel group"""
    dp: int
    """data-parallel replica"""
    pp: int
    """pipeline stage"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """A validated split of ``world_size`` ranks into ``pp x dp x tp``.

    Example:
        >>> layout = Layout(world_size=8, tp=4, dp=2)
        >>> layout.coords(5)
        Coords(tp=1, dp=1, pp=0)
        >>> layout.tp_group(5)
        (4, 5, 6, 7)
    """

    world_size: int
    """number of ranks in the job"""
    tp: int = 1
    """tensor-parallel degree (ranks sharing one copy of each layer)"""
    dp: int = 1
    """data-parallel replicas"""
    pp: int = 1
    """pipeline stages"""
    ep: int = 1
    """expert-parallel groups per stage: with ep > 1 the experts are split over ep groups of
    (dp x tp) / ep consecutive ranks, shared by all replicas; with 1, every DP replica holds
    every expert, sharded over its tp ranks"""

    def __post_init__(self) -> None:
        for axis in ("world_size", "tp", "dp", "pp", "ep"):
            _check_positive(axis, getattr(self, axis))
        if self.tp * self.dp * self.pp != self.world_size:
            raise LayoutError(
                f"layout does not fill the world: tp={self.tp} x dp={self.dp} x pp={self.pp} = "
                f"{self.tp * self.dp * self.pp}, but world size is {self.world_size}; "
                f"choose tp, dp and pp whose product is {self.world_size}")
        if (self.dp * self.tp) % self.ep:
            raise LayoutError(f"ep={self.ep} does not divide the {self.dp * self.tp} ranks of a pipeline stage "
                              f"(dp={self.dp} x tp={self.tp}); choose an ep that divides {self.dp * self.tp}")

    @property
    def expert_tp(self) -> int:
        """Ranks one expert is sharded over: tp when ep is 1, else (dp x tp) / ep."""
        return self.tp if self.ep == 1 else self.dp * self.tp // self.ep

    def expert_coords(self, rank: int) -> tuple[int, int]:
        """Returns (the expert group ``rank`` hosts, its index among that expert's shards).

        The group is in ``range(ep)``; with ep = 1 it is 0 in every replica.
        """
        c = self.coords(rank)
        if self.ep == 1:
            return 0, c.tp
        local = c.dp * self.tp + c.tp
        return local // self.expert_tp, local % self.expert_tp

    def expert_ranks(self, *, group: int, shard: int, pp: int) -> tuple[int, ...]:
        """Returns the ranks of stage ``pp`` that host expert group ``group``'s shard ``shard``
        (one per DP replica when ep is 1, else exactly one)."""
        if self.ep == 1:
            return tuple(self.rank(tp=shard, dp=d, pp=pp) for d in range(self.dp))
        local = group * self.expert_tp + shard
        return (self.rank(tp=local % self.tp, dp=local // self.tp, pp=pp),)

    def rank_classes(self) -> tuple[tuple[int, int], ...]:
        """Returns (first rank, number of ranks) for each set of ranks sharing TP index, stage,
        expert group and expert shard (ranks that read alike), in rank order, without visiting
        every rank: with ep = 1 the DP replicas of a TP index form one class.

        Example:
            >>> Layout(world_size=8, tp=2, dp=4).rank_classes()
            ((0, 4), (1, 4))
        """
        per_stage = self.dp * self.tp
        if self.ep == 1:
            return tuple((stage * per_stage + t, self.dp) for stage in range(self.pp) for t in range(self.tp))
        return tuple((rank, 1) for rank in range(self.world_size))  # expert coordinates differ on every rank

    def stage_ranks(self, pp: int) -> tuple[int, ...]:
        """Returns the ranks of pipeline stage ``pp``."""
        per = self.tp * self.dp
        return tuple(range(pp * per, (pp + 1) * per))

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, dp: int | None = None,
                  ep: int = 1) -> "Layout":
        """Builds a layout, deriving ``dp`` from the world size when it is not given.

        Example:
            >>> Layout.for_world(8, tp=2).dp
            4
        """
        for axis, value in (("world_size", world_size), ("tp", tp), ("pp", pp), ("dp", dp or 1)):
            _check_positive(axis, value)
        check_ranks(world_size, tp=tp, pp=pp, dp=dp)
        if dp is None:
            if world_size % (tp * pp):
                raise LayoutError(
                    f"world size {world_size} is not divisible by tp={tp} x pp={pp}; "
                    f"choose tp and pp whose product divides {world_size}")
            dp = world_size // (tp * pp)
        return cls(world_size=world_size, tp=tp, dp=dp, pp=pp, ep=ep)

    def coords(self, rank: int) -> Coords:
        """Returns the (tp, dp, pp) coordinates of ``rank``."""
        self._check_rank(rank)
        return Coords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank(self, *, tp: int, dp: int, pp: int = 0) -> int:
        """Returns the global rank at the given coordinates."""
        if not (0 <= tp < self.tp and 0 <= dp < self.dp and 0 <= pp < self.pp):
            raise LayoutError(f"coordinates tp={tp}, dp={dp}, pp={pp} lie outside {self.describe()}")
        return (pp * self.dp + dp) * self.tp + tp

    def tp_group(self, rank: int) -> tuple[int, ...]:
        """Returns the ranks of ``rank``'s tensor-parallel group, in TP order."""
        c = self.coords(rank)
        return tuple(self.rank(tp=i, dp=c.dp, pp=c.pp) for i in range(self.tp))

    def tp_groups(self) -> tuple[tuple[int, ...], ...]:
        """Returns every tensor-parallel group, in a fixed order all ranks agree on."""
        return tuple(tuple(range(start, start + self.tp)) for start in range(0, self.world_size, self.tp))

    def ranks_where(self, *, tp: int | None = None, pp: int | None = None) -> tuple[int, ...]:
        """Returns all ranks whose TP index and/or stage match, in rank order."""
        return tuple(r for r in range(self.world_size)
                     if (tp is None or r % self.tp == tp)
                     and (pp is None or r // (self.tp * self.dp) == pp))

    def stage_layers(self, num_layers: int, stage: int) -> range:
        """Returns the decoder layers of pipeline ``stage``: an even split, the first
        ``num_layers % pp`` stages taking one layer more.

        Example:
            >>> [list(Layout(world_size=3, pp=3).stage_layers(7, s)) for s in range(3)]
            [[0, 1, 2], [3, 4], [5, 6]]
        """
        if num_layers < self.pp:
            raise LayoutError(f"pp={self.pp} stages need at least {self.pp} decoder layers, the model has "
                              f"{num_layers}; choose pp <= {num_layers}")
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))

    def neighbour(self, rank: int, step: int) -> int | None:
        """Returns the rank at the same TP and DP position ``step`` stages away, or None."""
        c = self.coords(rank)
        return self.rank(tp=c.tp, dp=c.dp, pp=c.pp + step) if 0 <= c.pp + step < self.pp else None

    def describe(self) -> str:
        return f"world={self.world_size} (tp={self.tp}, dp={self.dp}, pp={self.pp}, ep={self.ep})"

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp": self.tp, "dp": self.dp, "pp": self.pp, "ep": self.ep}

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside world size {self.world_size}")


def _check_positive(axis: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"layout {axis} must be a positive integer, got {value!r}")


TORCHRUN_START = "torchrun --nproc-per-node {need} -m distload ..."
"""how the message of too few ranks says to start ``need`` of them, unless a launcher says its own way"""


def check_ranks(world_size: int, *, tp: int, pp: int, dp: int | None, start: str = TORCHRUN_START) -> None:
    """Raises when tp x pp (x dp) needs more ranks than ``world_size``, saying how to start them
    (``start``, with ``{need}``: the launcher's own option) or plan the layout without them.

    Raises:
        LayoutError: the world is too small for the layout.

    Example:
        >>> check_ranks(2, tp=4, pp=1, dp=None, start="launch/ray_launch.py ... --num-ranks {need}")
        Traceback (most recent call last):
        ...
        distload.errors.LayoutError: tp=4 x pp=1 needs 4 ranks, but the world has 2: start 4 (launch/ray_launch.py ... --num-ranks 4), or plan the layout without them: python -m distload CHECKPOINT --dry-run --world 4 ...
    """
    need = tp * pp * (dp or 1)
    if need > world_size:
        raise LayoutError(
            f"tp={tp} x pp={pp}{f' x dp={dp}' if dp else ''} needs {need} ranks, but the world has "
            f"{world_size}: start {need} ({start.format(need=need)}), or plan "
            f"the layout without them: python -m distload CHECKPOINT --dry-run --world {need} ...")
