"""Loading onto Ray actors, one per rank (the optional ``ray`` extra: ``pip install distload[ray]``).

Two ways in:

- ``load``: distload starts the actors (one placement-group bundle per rank), forms their
  process group (NCCL on GPU, gloo on CPU) at the rank-0 actor's node, loads, and returns a
  driver-side ``RayLoaded`` handle; the model stays resident in the actors.
- ``rendezvous``: a serving engine's own actors (holding the engine's model) get one
  ``WorldInfo`` per rank to pass to ``distload.load(..., world=..., build=...)`` themselves.

Ray is imported only when one of these runs, so ``distload`` never needs it.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .comm import WorldInfo
from .config import LoadConfig
from .errors import ConfigError, DistloadError, PeerFailedError
from .layout import Layout
from .models import ModelBuilder, reference_model
from .ray_actor import ParamChecksum, RankActor, node_address
from .report import LoadReport

STRATEGIES = ("PACK", "STRICT_PACK")
"""placement strategies that keep a job's ranks together (STRICT_PACK: on one node)"""

READY_TIMEOUT = 120.0
"""seconds to wait for the cluster to place the bundles (or the rendezvous probe) before failing"""

CLOSE_TIMEOUT = 30.0
"""seconds ``unload`` waits for the actors to close their process group before killing them"""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankOutcome:
    """What one rank's actor gave back from its load."""

    rank: int
    """the global rank"""
    report: LoadReport | None = None
    """the rank's report (the job's merged one), also of an incomplete load; None after another error"""
    error: DistloadError | None = None
    """what the rank raised (``MissingWeightsError`` for an incomplete load); None when it loaded"""
    lost: bool = False
    """the rank's actor died: it gave back nothing"""


def rendezvous(node_ids: Sequence[str], *, master_addr: str | None = None, master_port: int | None = None,
               timeout: float = READY_TIMEOUT) -> list[WorldInfo]:
    """Returns the ``WorldInfo`` of each rank of a job whose ranks are the caller's own Ray actors.

    Rank ``r`` runs on the node ``node_ids[r]`` (what ``ray.get_runtime_context().get_node_id()``
    returns inside that actor). The rendezvous address is rank 0's node IP and a port free
    there, found by a small task placed on that node; local ranks count each node's ranks in
    rank order. Pass each actor its entry, for ``distload.load(..., world=world)``.

    Args:
        node_ids: the Ray node id of each rank's actor, in rank order.
        master_addr: rank 0's address to use instead of its node IP (another interface).
        master_port: the port to use instead of a free one found on rank 0's node.
        timeout: seconds to wait for the probe task.

    Returns:
        One ``WorldInfo`` per rank, with ``master_addr`` and ``master_port`` set.

    Raises:
        DistloadError: Ray is not installed, or rank 0's node did not answer within ``timeout``.

    Example:
        >>> ids = ray.get([w.node_id.remote() for w in workers])          # doctest: +SKIP
        >>> worlds = distload.ray.rendezvous(ids)                         # doctest: +SKIP
        >>> ray.get([w.load.remote(ckpt, wi) for w, wi in zip(workers, worlds)])  # doctest: +SKIP
    """
    ray = _ray()
    if not node_ids:
        raise ConfigError("rendezvous needs the node id of at least one rank")
    if master_addr is None or master_port is None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        probe = ray.remote(num_cpus=0)(node_address).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_ids[0], soft=False))
        addr, port = _get(ray, probe.remote(), timeout, f"rank 0's node {node_ids[0]} did not answer")
        master_addr, master_port = master_addr or addr, master_port or port
    return worlds_for(node_ids, master_addr=master_addr, master_port=master_port)


def worlds_for(node_ids: Sequence[str], *, master_addr: str, master_port: int) -> list[WorldInfo]:
    """Returns each rank's ``WorldInfo``: its local rank is its place among the ranks of its node.

    Example:
        >>> [(w.local_rank, w.local_world_size) for w in worlds_for(["a", "b", "a"], master_addr="h", master_port=1)]
        [(0, 2), (0, 1), (1, 2)]
    """
    per_node = collections.Counter(node_ids)
    seen: collections.Counter = collections.Counter()
    out = []
    for rank, node in enumerate(node_ids):
        out.append(WorldInfo(rank=rank, world_size=len(node_ids), local_rank=seen[node],
                             local_world_size=per_node[node], master_addr=master_addr, master_port=master_port))
        seen[node] += 1
    return out


def load(checkpoint: str, config: LoadConfig = LoadConfig(), *, num_ranks: int | None = None,
         placement_group: Any = None, strategy: str = "PACK", build: ModelBuilder = reference_model,
         master_addr: str | None = None, master_port: int | None = None, progress: bool = False,
         ready_timeout: float = READY_TIMEOUT) -> "RayLoaded":
    """Loads ``checkpoint`` onto one new Ray actor per rank and returns the driver's handle.

    Call it from a Ray driver (``ray.init`` first, or Ray starts a local cluster). The
    checkpoint must be at the same path on every node that hosts a rank.

    Args:
        checkpoint: the checkpoint directory, as the actors see it.
        config: the load's options (``device=None``: cuda when the cluster has GPUs).
        num_ranks: the world size; default ``tp x pp x (dp or 1)``.
        placement_group: a ready placement group with a bundle per rank to use (bundle ``r``
            hosts rank ``r``); default: one is made, ``{"GPU": 1}`` or ``{"CPU": 1}`` a bundle,
            and removed by ``unload``.
        strategy: ``PACK`` (default) or ``STRICT_PACK`` for the placement group made here.
        build: the model builder, as for ``distload.load`` (it must pickle: a module-level function).
        master_addr: rendezvous address instead of the rank-0 actor's node IP (another interface).
        master_port: rendezvous port instead of one free on rank 0's node.
        progress: rank 0 prints its read progress (Ray forwards it to the driver's stderr).
        ready_timeout: seconds to wait for the cluster to place the bundles.

    Returns:
        ``RayLoaded``, holding the job's merged ``LoadReport`` (rank 0's) and every rank's
        ``RankOutcome``.

    Raises:
        ConfigError: a bad strategy or world, or a ``placement_group`` with fewer bundles than
            ranks, or bundles that do not hold one rank's actor (``{"GPU": 1}`` / ``{"CPU": 1}``).
        DistloadError: the error of the reporting rank (the lowest rank not lost), e.g.
            ``MissingWeightsError`` with its report, or ``PeerFailedError`` naming a rank whose
            actor died; once the ranks ran, its ``outcomes`` holds every rank's ``RankOutcome``.
            No actor (or placement group made here) is left running.

    Example:
        >>> with distload.ray.load(ckpt, distload.LoadConfig(tp=4)) as model:   # doctest: +SKIP
        ...     logits = model.forward(torch.tensor([[1, 2, 3]]))
    """
    ray = _ray()
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if num_ranks is not None and num_ranks < 1:
        raise ConfigError(f"num_ranks must be at least 1, got {num_ranks}")
    world = num_ranks or config.tp * config.pp * (config.dp or 1)
    layout = config.layout(world)  # a layout that does not fit is said before any actor starts
    gpu = _wants_gpu(ray, config)
    config = config if config.device else _with_device(config, "cuda" if gpu else "cpu")
    bundle = {"GPU": 1} if gpu else {"CPU": 1}
    owns_pg = placement_group is None
    if not owns_pg:
        _check_group(placement_group, world, bundle)
    pg = _make_group(ray, world, bundle, strategy, ready_timeout) if owns_pg else placement_group
    actors: list = []
    try:
        actors = _start_actors(ray, pg, world, gpu)
        where = _get(ray, [a.where.remote() for a in actors], ready_timeout, "the actors did not start")
        node_ids, pids = [w[0] for w in where], [w[3] for w in where]
        worlds = worlds_for(node_ids, master_addr=master_addr or where[0][1], master_port=master_port or where[0][2])
        refs = [a.load.remote(checkpoint, config, w, build, progress and w.rank == 0) for a, w in zip(actors, worlds)]
        outcomes = _outcomes(ray, refs)
        report = _verdict(outcomes, world)
    except BaseException:
        _teardown(ray, actors, pg if owns_pg else None)
        raise
    return RayLoaded(ray=ray, actors=actors, pids=pids, report=report, outcomes=outcomes, layout=layout,
                     placement_group=pg if owns_pg else None)


class RayLoaded:
    """The driver's handle on a model resident in Ray actors, one per rank.

    Use it as a context manager, or call ``unload`` when done.
    """

    def __init__(self, *, ray, actors: list, pids: list[int], report: LoadReport, outcomes: Sequence[RankOutcome],
                 layout: Layout, placement_group: Any) -> None:
        self._ray = ray
        self._actors: list | None = actors
        self._pg = placement_group  # removed by unload: made by ``load``; None: the caller's
        self.report = report
        """the job's merged report (rank 0's; the same on every rank)"""
        self.outcomes = tuple(outcomes)
        """each rank's ``RankOutcome``, in rank order (each with its own report)"""
        self.layout = layout
        """the layout the ranks loaded"""
        self.pids = tuple(pids)
        """each rank's actor process id (on its own node)"""

    @property
    def actors(self) -> list:
        """The rank actors, in rank order (empty after ``unload``)."""
        return list(self._actors or ())

    def forward(self, input_ids: torch.Tensor, *, timeout: float | None = None) -> torch.Tensor:
        """Runs the model on every rank (TP collectives need them all) and returns the logits of
        the first rank of the last pipeline stage: ``[batch, seq, vocab]``.

        Raises:
            DistloadError: the model was unloaded, or a rank failed (named).
        """
        last = self.layout.rank(tp=0, dp=0, pp=self.layout.pp - 1)
        refs = [a.forward.remote(input_ids, rank == last) for rank, a in enumerate(self._live())]
        return self._results(refs, timeout)[last]

    def checksums(self, *, timeout: float | None = None) -> list[dict[str, ParamChecksum]]:
        """Returns, per rank, a ``ParamChecksum`` of every tensor of its state dict, by name."""
        return self._results([a.checksums.remote() for a in self._live()], timeout)

    def unload(self) -> None:
        """Closes the process group, kills the actors and removes the placement group made by
        ``load``; a second call does nothing."""
        if self._actors is None:
            return
        actors, self._actors = self._actors, None
        with contextlib.suppress(Exception):  # a dead or stuck actor is killed all the same
            self._ray.get([a.close.remote() for a in actors], timeout=CLOSE_TIMEOUT)
        _teardown(self._ray, actors, self._pg)

    def __enter__(self) -> "RayLoaded":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    def _live(self) -> list:
        if self._actors is None:
            raise DistloadError("the model was unloaded: its actors are gone")
        return self._actors

    def _results(self, refs: list, timeout: float | None) -> list:
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(self._ray.get(ref, timeout=timeout))
            except self._ray.exceptions.GetTimeoutError:
                raise DistloadError(f"rank {rank} did not answer within {timeout} s", rank=rank) from None
            except self._ray.exceptions.RayError as err:
                raise _actor_error(self._ray, err, rank) from None
        return out


def _ray():
    try:
        import ray
    except ImportError:
        raise DistloadError("distload.ray needs Ray, which is not installed: pip install distload[ray]") from None
    return ray


def _wants_gpu(ray, config: LoadConfig) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.device == "cuda" and not gpus:
        raise ConfigError("device cuda, but the Ray cluster has no GPUs; use device cpu")
    return config.device != "cpu" and gpus > 0


def _with_device(config: LoadConfig, device: str) -> LoadConfig:
    import dataclasses
    return dataclasses.replace(config, device=device)


def _make_group(ray, world: int, bundle: dict, strategy: str, timeout: float):
    from ray.util.placement_group import placement_group, remove_placement_group
    pg = placement_group([dict(bundle) for _ in range(world)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise DistloadError(f"Ray could not place {world} bundles of {bundle} ({strategy}) within {timeout:.0f} s; "
                            f"the cluster has {_resources(ray)}") from None
    return pg


def _check_group(pg, world: int, bundle: dict) -> None:
    """Refuses a caller's placement group that cannot host one rank's actor in each of bundles
    0..world-1 (its actors would wait for resources that never come)."""
    count = pg.bundle_count
    if count < world:
        raise ConfigError(f"the placement group has {count} bundle{'s' if count != 1 else ''}, but the job has "
                          f"{world} ranks (one bundle per rank)")
    (resource, amount), = bundle.items()
    short = [r for r, spec in enumerate(pg.bundle_specs[:world]) if spec.get(resource, 0) < amount]
    if short:
        raise ConfigError(f"bundles {short} of the placement group have less than {amount:g} {resource}; each rank's "
                          f"actor needs {bundle}")


def _resources(ray) -> str:
    res = ray.cluster_resources()
    return ", ".join(f"{k} {res[k]:g}" for k in ("CPU", "GPU") if k in res) or "no CPU or GPU"


def _start_actors(ray, pg, world: int, gpu: bool) -> list:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    cls = ray.remote(RankActor)
    return [cls.options(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=pg, placement_group_bundle_index=rank)).remote()
            for rank in range(world)]


def _outcomes(ray, refs: list) -> list[RankOutcome]:
    """Each rank's outcome, in rank order."""
    out = []
    for rank, ref in enumerate(refs):
        try:
            report, err = ray.get(ref)
        except ray.exceptions.RayActorError:
            out.append(RankOutcome(rank=rank, lost=True))
            continue
        except ray.exceptions.RayError as bug:  # a bug in the rank (not a DistloadError)
            report, err = None, _actor_error(ray, bug, rank)
        out.append(RankOutcome(rank=rank, report=getattr(err, "report", None) if err else report, error=err))
    return out


def _verdict(outcomes: list[RankOutcome], world: int) -> LoadReport:
    """Rank 0's report when every rank loaded; else raises the reporting rank's error (the
    lowest rank not lost, as ``distload.verdict.reporter`` chooses), with ``outcomes`` attached."""
    dead = sorted(o.rank for o in outcomes if o.lost)
    errors = {o.rank: o.error for o in outcomes if o.error is not None}
    if not dead and not errors:
        return outcomes[0].report
    lost = set(dead)
    for err in errors.values():
        lost |= set(getattr(err, "lost_ranks", ()) or ())
    speaker = next((r for r in range(world) if r in errors and r not in lost), None)
    if speaker is None:
        err = PeerFailedError(f"the actors of ranks {sorted(lost)} died and no rank reported why",
                              rank=min(lost), failed_rank=min(lost))
    else:
        err = errors[speaker]
        if dead and isinstance(err, PeerFailedError):
            err.failed_rank = dead[0] if err.failed_rank is None else err.failed_rank
            err.lost_ranks = tuple(dead)
    err.outcomes = tuple(outcomes)
    raise err


def _actor_error(ray, err: Exception, rank: int) -> DistloadError:
    if isinstance(err, ray.exceptions.RayActorError):
        return PeerFailedError(f"rank {rank}'s actor died", rank=rank, failed_rank=rank)
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, DistloadError):
        return cause.with_rank(rank)
    return DistloadError(f"{type(cause).__name__}: {cause}", rank=rank)


def _teardown(ray, actors: list, pg) -> None:
    """Kills the actors and removes ``pg`` (None: the caller's, left alone)."""
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    if pg is not None:
        from ray.util.placement_group import remove_placement_group
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def _get(ray, refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise DistloadError(f"{what} within {timeout:.0f} s") from None
    except ray.exceptions.RayError as err:  # an actor that died while starting
        raise DistloadError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


__all__ = ["ParamChecksum", "RankActor", "RankOutcome", "RayLoaded", "load", "rendezvous", "worlds_for", "STRATEGIES"]
