"""Simulated ranks for ``distload.track``'s merge in one process: one thread per rank, and
collectives that meet at a barrier (an all-gather is the list of every rank's value, a sum
all-reduce their sum), exactly what ``comm.GroupComm`` does across processes. Also the
expectations a rank of a distload ``Plan`` would declare, so that ``track`` and ``load``'s own
merge can be compared on the same simulated load.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from distload.checkpoint.directory import Checkpoint
from distload.errors import DistloadError
from distload.plan import Plan
from distload.track import Expectations, Key, Recorder
from distload.units import Unit


class SimGroup:
    """``size`` simulated ranks; ``run(fn)`` calls ``fn(comm)`` on each, in its own thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=60)
        self._slots: list = [None] * size
        self.sent = [0] * size
        """bytes each rank contributed to collectives (its tensors' sizes)"""

    def run(self, fn: Callable[["SimComm"], object]) -> list:
        out: list = [None] * self.size

        def body(rank: int) -> None:
            try:
                out[rank] = fn(SimComm(self, rank))
            except DistloadError as err:  # raised by every rank alike: the others are not waiting
                out[rank] = err
            except BaseException as err:  # a bug on one rank: release the others
                out[rank] = err
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def exchange(self, rank: int, value) -> list:
        self._slots[rank] = value
        self._barrier.wait()
        everyone = list(self._slots)
        self._barrier.wait()
        return everyone


class SimComm:
    """One simulated rank's collectives (the interface ``track.merge`` drives)."""

    def __init__(self, group: SimGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size
        self.ranks = tuple(range(group.size))

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        self.group.sent[self.rank] += row.numel() * row.element_size()
        return torch.stack(self.group.exchange(self.rank, row.clone()))

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        self.group.sent[self.rank] += counts.numel() * counts.element_size()
        return torch.stack(self.group.exchange(self.rank, counts.clone())).sum(0).to(counts.dtype)

    def gather_objects(self, obj: object) -> list:
        return self.group.exchange(self.rank, obj)


def unit_key(unit: Unit) -> Key:
    """The key a rank declares for one unit of a distload plan."""
    return Key.of(unit.name, dim=unit.dim, index=unit.index, num_shards=unit.num_shards, region=unit.region)


def plan_rank(p: Plan, rank: int, skip: set[str] = frozenset()) -> tuple[Expectations, Recorder]:
    """What rank ``rank`` of plan ``p`` expects (its owned units, with their roles; the plan's
    derived parameters of its stage), and a record of it loading every read but those of ``skip``."""
    rp = p.for_rank(rank)
    exp = Expectations()
    for u in rp.owned:
        unit = p.units[u]
        spec = next(s for s in p.specs if s.name == unit.param)
        exp.expect(unit_key(unit), param=unit.param, optional=spec.default if unit.role.value == "optional" else None)
    stage = p.layout.coords(rank).pp
    for spec in p.specs:
        if spec.derived_from and spec.stage == stage:
            exp.derive(spec.name, spec.derived_from)
    rec = Recorder(exp, {})
    for read in rp.reads:
        if read.tensor.name not in skip and not read.verify:
            rec.mark(unit_key(p.units[read.unit]))
    return exp, rec


def plan_checkpoint(p: Plan) -> Checkpoint:
    """A ``Checkpoint`` holding the plan's tensor headers (no files: the merge reads headers only)."""
    return Checkpoint(directory="/synthetic", config={}, tensors=dict(p.tensors), files=(), sizes={})


MIXTRAL = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 16,
           "num_experts_per_tok": 2}
"""a tiny Mixtral: 16 experts of width 64 in each of 2 layers"""


def moe_plan(layout, *, redundant: int = 0, drop=()) -> Plan:
    """The plan of distload's reference Mixtral (``MIXTRAL``) for ``layout``."""
    from tests.synthetic import reference_plan

    return reference_plan(MIXTRAL, layout, redundant=redundant, drop=drop)


def load_findings(p: Plan, skip: dict[int, set[str]]):
    """``load``'s own merge of the same simulated load (``tracking`` over the plan's unit table)."""
    from distload import tracking

    records = [tracking.record(p, [r.unit for r in p.for_rank(rank).reads
                                   if r.tensor.name not in skip.get(rank, ()) and not r.verify])
               for rank in range(p.layout.world_size)]
    verdict = tracking.classify(p, torch.stack(records).sum(0))
    rows = torch.stack([tracking.exchange_rows(p, verdict, r) for r in records]) if verdict.failed else None
    return tracking.findings(p, verdict, rows)


def track_reports(p: Plan, skip: dict[int, set[str]], **merge_options) -> list:
    """``distload.track.merge`` on every simulated rank of ``p``'s layout (a report or an error per rank)."""
    from distload.track.merge import merge_with

    group, ckpt = SimGroup(p.layout.world_size), plan_checkpoint(p)
    return group.run(lambda c: merge_with(c, *plan_rank(p, c.rank, skip.get(c.rank, set())), checkpoint=ckpt,
                                          layout=p.layout, **merge_options))
