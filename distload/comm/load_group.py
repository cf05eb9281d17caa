"""The load's process group: creating it, the collectives of the tracking merge, and the
failure watch beside them (a failed or silent rank ends every rank's wait)."""

from __future__ import annotations

import datetime
import os
import threading
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistloadError, PeerFailedError
from ..layout import Layout
from ..watch import STORE_SLACK, FailureWatch
from .model_ops import SOLO, Collectives
from .world import WorldInfo

ABORT_WAIT = STORE_SLACK
"""seconds a failing rank waits for NCCL's abort before it raises its error all the same: the
slack a store call gets on a busy host, since an abort is as much a bounded cleanup as that call"""


class Comm:
    """The job's process group: counts collectives for tracking and per-axis groups for models.

    A job of one rank creates no process group; one that already exists (created by
    the caller) is used even at world size 1, so its backend runs every collective.
    """

    def __init__(self, *, rank: int, world_size: int, device: torch.device, owns_group: bool,
                 grouped: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device  # where collective tensors live (cuda for NCCL)
        self._owns_group = owns_group
        self._grouped = grouped  # collectives go through torch.distributed
        self._tp: dict[tuple[int, ...], Collectives] = {}
        self._watch: FailureWatch | None = None
        self._group_timeout = datetime.timedelta(minutes=10)  # the collectives' timeout, as connect() makes it
        self._failed = False  # this load failed (here or on a peer): NCCL's groups are aborted, not destroyed
        self._aborted = False  # once: the abort clears torch's global group state

    @classmethod
    def connect(cls, world: WorldInfo, *, device: torch.device,
                timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> "Comm":
        """Joins (or reuses) the default process group; backend follows the device.

        Uses ``world.master_addr``/``master_port`` (a ``tcp://`` rendezvous) when given, else
        ``env://`` (``MASTER_ADDR``/``MASTER_PORT``), when no group exists yet.
        """
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != world.world_size or dist.get_rank() != world.rank:
                raise ConfigError(f"an existing process group has rank {dist.get_rank()} of "
                                  f"{dist.get_world_size()}, expected {world.rank} of {world.world_size}")
            return cls(rank=world.rank, world_size=world.world_size, device=device, owns_group=False,
                       grouped=True)
        if world.world_size == 1:
            return cls(rank=0, world_size=1, device=device, owns_group=False, grouped=False)
        backend = "nccl" if device.type == "cuda" else "gloo"
        where = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # NCCL's communicator is made here, bound to this rank's device, not lazily in the load's
            # first collective: there its creation would block until every rank joined, where no
            # failure watch can reach it, while a collective on a made one only queues work (_wait)
            where["device_id"] = device
        url = "env://"
        if world.master_addr is not None and world.master_port is not None:  # Ray: no environment to read
            host = f"[{world.master_addr}]" if ":" in world.master_addr else world.master_addr
            url = f"tcp://{host}:{world.master_port}"
        store = _generation_store(url, world, timeout)
        dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, timeout=timeout,
                                store=store, **where)
        comm = cls(rank=world.rank, world_size=world.world_size, device=device, owns_group=True, grouped=True)
        comm._group_timeout = timeout
        return comm

    def close(self) -> None:
        """Stops failure watching and destroys the process group if this object created it (after a
        failed load, NCCL's is aborted instead: a graceful NCCL teardown may wait for a lost peer)."""
        self.stop_watch()
        if self._owns_group and dist.is_initialized():
            if not (self._failed and self._nccl and self._abort()):
                dist.destroy_process_group()
        self._owns_group = False

    @property
    def _nccl(self) -> bool:
        return self._grouped and self.device.type == "cuda"

    def _abort(self) -> bool:
        """Aborts every NCCL communicator of this process at once (the world's and its subgroups',
        torch's ``_abort_process_group``, torch >= 2.5): their pending collectives end, and the
        process can go on. On a thread of its own, waited for at most ``ABORT_WAIT`` seconds: torch
        waits for NCCL's abort up to the group's timeout, and some NCCL versions hung in it.
        Returns False where torch has no such abort (before 2.5)."""
        if self._aborted:
            return True
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is None or not dist.is_initialized():  # torch 2.4: pending collectives stay queued
            return False  # and ``close`` destroys the group, so that a later load can make one
        self._aborted, self._owns_group = True, False  # nothing is left to destroy

        def run() -> None:
            try:
                abort()
            except Exception:  # the load's own error is the one to report
                pass
        thread = threading.Thread(target=run, name="distload-nccl-abort", daemon=True)
        thread.start()
        thread.join(ABORT_WAIT)
        return True

    def start_watch(self, *, dead_after: float, timeout: float = 600.0) -> None:
        """Starts publishing this rank's heartbeat and watching for failed or silent peers.

        Failures travel out of band, through the rendezvous store: a collective timeout
        cannot tell a dead rank from a slow read, and would hold every rank for minutes.
        Without a store (a caller-made group without one) collectives block as usual.
        """
        if not self._grouped or self.world_size == 1 or self._watch is not None:
            return
        store = _default_store()
        if store is not None:
            self._watch = FailureWatch(store, rank=self.rank, world_size=self.world_size, dead_after=dead_after,
                                       timeout=timeout, store_host=self._store_host())
            self._set_collective_timeout(datetime.timedelta(seconds=dead_after))

    def _set_collective_timeout(self, timeout: datetime.timedelta) -> None:
        """Sets the timeout of this object's own gloo group. While watched, each collective starts
        once every rank has met, so one that waits the failure timeout has lost a rank (stopped
        inside it): it fails then, not after the group's 10 minutes. NCCL's is left alone (its
        watchdog would end the process)."""
        if self._owns_group and self.device.type == "cpu":
            try:
                dist.distributed_c10d._set_pg_timeout(timeout)
            except (AttributeError, AssertionError, RuntimeError, ValueError):  # an older torch: unbounded
                pass

    def _store_host(self) -> int | None:
        """The rank whose process serves the rendezvous store: rank 0 for a group this object made
        without torchrun's agent store (torch's env:// rendezvous); None when the launcher or the
        caller serves it."""
        if self._owns_group and not _agent_store():
            return 0
        return None

    def stop_watch(self) -> None:
        """Stops the heartbeat (after the load's last collective)."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
            self._set_collective_timeout(self._group_timeout)  # a kept group's model collectives may wait

    def publish_failure(self, err: DistloadError) -> None:
        """Tells every rank, out of band, that this rank failed with ``err``."""
        self._failed = True
        if self._watch is not None:
            self._watch.publish(self.rank, err)
            self._watch.linger(self._store_linger(2.0))

    def peer_failed(self) -> None:
        """This rank read a peer's failure: its group is to be aborted rather than destroyed, and
        if it may serve the store it waits, like the failing rank, until the others have read it."""
        self._failed = True
        if self._watch is not None:
            self._watch.linger(self._store_linger(0.0))

    def _store_linger(self, otherwise: float) -> float:
        """How long a failing rank waits for its peers to read its failure before it goes on (and
        may exit, which under torchrun ends the other ranks too). The wait ends once every peer
        has read the failure (within a heartbeat) or failed itself. A process that may serve the
        store waits up to the failure timeout, not 2 s: a peer still starting its load, many
        seconds behind on a busy host, would find no store and report that instead of the error.
        Any other rank waits ``otherwise``."""
        host = self._store_host()
        if _agent_store() or (host is not None and host != self.rank):
            return otherwise
        return self._watch.dead_after + STORE_SLACK

    def check_peers(self) -> None:
        """Raises PeerFailedError if another rank published a failure or fell silent."""
        if self._watch is not None:
            self._watch.check()

    def _collective(self, start: Callable[[], "dist.Work"]) -> None:
        """Runs one collective (``start`` issues it with ``async_op=True``) once every rank is ready
        for it, and waits for it, watching for failed peers.

        Ranks meet in the store first, so a collective only starts when all ranks have
        reached it: a failure before that leaves no operation pending, and the group
        can still be torn down at once (a pending gloo operation would hold it).
        """
        if self._watch is not None:
            self._watch.meet()
        work = self._guarded(start)
        self._guarded(lambda: self._wait(work))

    def _wait(self, work: "dist.Work") -> None:
        """Waits for an issued collective. gloo's wait blocks in the host, and its timeout (the
        failure timeout, while watched) ends it when a rank was lost inside. NCCL's runs on the
        device, where a lost peer leaves it waiting for good: its completion is polled beside the
        failure channel, and a failure learned meanwhile (a peer's error, or a silence its watcher
        published) aborts the communicators (a caller's group too: its pending work would never
        end) before it is raised."""
        if self._watch is None or not self._nccl:
            work.wait()
            return
        try:
            self._watch.wait_until(work.is_completed)
        except PeerFailedError:
            self._failed = True
            self._abort()
            raise
        work.wait()  # makes this stream wait for NCCL's (the work is done: the host does not wait)

    def _guarded(self, run: Callable[[], object]) -> object:
        """Runs a torch.distributed call; a peer lost inside it (a reset connection, the store's
        host gone) becomes the PeerFailedError that names it, never torch's own error."""
        try:
            return run()
        except RuntimeError as err:
            if self._watch is None:
                raise PeerFailedError(f"a collective failed: {type(err).__name__}: {err}", rank=self.rank) from None
            self._watch.await_failure(err)
            raise  # await_failure always raises; this keeps type checkers honest

    def tp_collectives(self, layout: Layout) -> Collectives:
        """Returns collectives over this rank's tensor-parallel group (bound by ``create_groups``).

        Models are built with them before the ranks have agreed on the layout; the
        subgroups are created only afterwards, since ranks that disagree on it would
        otherwise block each other in ``new_group``.
        """
        if layout.tp == 1:
            return SOLO
        key = layout.tp_group(self.rank)
        if key not in self._tp:
            self._tp[key] = Collectives(None, layout.tp)
        return self._tp[key]

    def stage_collectives(self, layout: Layout) -> Collectives:
        """Returns collectives over all ranks of this rank's pipeline stage (bound by ``create_groups``)."""
        key = layout.stage_ranks(layout.coords(self.rank).pp)
        if len(key) == 1:
            return SOLO
        if key not in self._tp:
            self._tp[key] = Collectives(None, len(key))
        return self._tp[key]

    def create_groups(self, layout: Layout) -> None:
        """Creates every TP subgroup (and stage group, when experts span a stage), in the same
        order on every rank, and binds this rank's."""
        wanted = [layout.tp_groups()] if 1 < layout.tp < self.world_size else []
        if layout.pp > 1:  # stage collectives (the expert exchange, a custom builder's) need them
            wanted.append(tuple(layout.stage_ranks(s) for s in range(layout.pp)))
        for groups in wanted:
            mine = next(g for g in groups if self.rank in g)
            ops = self._tp.get(mine)
            if ops is not None and ops.group is not None:
                continue
            for ranks in groups:
                group = self._guarded(lambda: dist.new_group(list(ranks), timeout=self._connect_timeout()))
                if ranks == mine:
                    self._restore_timeout(group)
                    if ops is not None:
                        ops.group = group
            if self._watch is not None:
                # no rank goes on while others still connect: torch's own store calls in new_group
                # have no deadline of ours, and would wait out a store host stopped meanwhile
                self._watch.meet()

    def _connect_timeout(self) -> datetime.timedelta | None:
        """How long a new gloo group may take to connect: the failure timeout. A rank lost while the
        others connect (gloo waits for its address, or retries its connection, until the group's
        timeout) fails them within it, not after the 10 minutes a model's collectives may wait.
        NCCL's keep the job's timeout: it does not bound their connection, and a short one left on
        would have NCCL's watchdog end the process in a long collective of the model."""
        if self._watch is None or self._nccl:
            return None
        return datetime.timedelta(seconds=self._watch.dead_after)

    def _restore_timeout(self, group) -> None:
        """Gives a group connected under ``_connect_timeout`` the job's timeout for its collectives."""
        if self._connect_timeout() is None:
            return
        try:
            dist.distributed_c10d._set_pg_timeout(self._group_timeout, group)
        except (AttributeError, AssertionError, RuntimeError, ValueError):  # an older torch: the short one stays
            pass

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sums an integer tensor over all ranks (the one tracking collective)."""
        if not self._grouped:
            return counts
        # a copy even on CPU (where .to() returns ``counts`` itself): all_reduce sums in
        # place, and the caller still needs its own record to name loaded_by afterwards
        on_device = counts.to(self.device, copy=True)
        self._collective(lambda: dist.all_reduce(on_device, async_op=True))
        return on_device.cpu()

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Stacks every rank's equally sized 1-D ``row`` into ``[world, len]``."""
        if not self._grouped:
            return row.unsqueeze(0)
        local = row.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        # the list form works on every backend and torch version
        self._collective(lambda: dist.all_gather(parts, local, async_op=True))
        return torch.stack(parts).cpu()

    def gather_objects(self, obj: object) -> list:
        """Gathers one small picklable object per rank (failure texts, baselines)."""
        if not self._grouped:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._grouped:
            dist.barrier()


def _generation_store(url: str, world: WorldInfo, timeout: datetime.timedelta):
    """The rendezvous store for a new default group, under a key prefix of its own.

    torch names groups by a count it restarts once the default group is destroyed, so a second
    group of one process would reuse the first one's keys in a store that outlives it (torchrun's
    agent store): a rank could read a peer's stale gloo address and fail to connect. Every rank
    joining adds one to a counter; the ranks of one group all join before any of them can make the
    next one (making it needs all of them), so ``(count - 1) // world_size`` numbers the groups
    alike on every rank. A group that never formed (a peer that never joined) leaves the count
    off by its joiners, so a later group of those processes in that same store waits out its
    timeout: after such a failure, restart the job rather than load again in it.
    """
    store, _, _ = next(dist.rendezvous(url, world.rank, world.world_size, timeout=timeout))
    store.set_timeout(timeout)
    generation = (int(store.add("distload/groups", 1)) - 1) // world.world_size
    return dist.PrefixStore(f"distload/group/{generation}/default_pg", store)


def _agent_store() -> bool:
    """Whether torchrun's agent serves the rendezvous store (it outlives every rank)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _default_store():
    """The default group's rendezvous store, or None (a group made without one)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def destroy_default_group() -> None:
    """Destroys the default process group if one exists (test harnesses, between jobs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
