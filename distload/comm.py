"""The only module that talks to torch.distributed.

Everything above it (planning, tracking, models) calls these small wrappers, so
the backend (gloo on CPU, NCCL on CUDA) and process-group handling live here.
"""

from __future__ import annotations

import datetime
import os
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .errors import ConfigError, DistloadError, PeerFailedError
from .layout import Layout


class Collectives:
    """Tensor collectives over one group of ranks; with one rank they are identities."""

    def __init__(self, group: "dist.ProcessGroup | None" = None, size: int = 1) -> None:
        self.group = group
        self.size = size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the group, in place, and returns it."""
        if self.size > 1:
            _check_open()
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenates every rank's ``tensor`` along ``dim``, in group order."""
        if self.size == 1:
            return tensor
        _check_open()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def _check_open() -> None:
    if not dist.is_initialized():
        raise DistloadError("the model's process group is closed: call distload.load(..., keep_group=True) "
                            "to run a model split over several ranks, and Loaded.close() when done")


SOLO = Collectives()
"""Collectives of a group of one rank (no process group needed)."""


class PipeOps:
    """Hands activations to the next pipeline stage and takes them from the previous one."""

    def __init__(self, prev: int | None = None, next: int | None = None) -> None:
        self.prev, self.next = prev, next

    @property
    def first(self) -> bool:
        return self.prev is None

    @property
    def last(self) -> bool:
        return self.next is None

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Receives the previous stage's output of ``shape``."""
        _check_open()
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=self.prev)
        return out

    def send_next(self, tensor: torch.Tensor) -> None:
        """Sends this stage's output to the next stage."""
        _check_open()
        dist.send(tensor.contiguous(), dst=self.next)


SINGLE_STAGE = PipeOps()
"""A model with one pipeline stage."""


def pipe_ops_for(layout: Layout, rank: int) -> PipeOps:
    """Returns ``rank``'s hand-off to its neighbours in the pipeline (same TP and DP place)."""
    if layout.pp == 1:
        return SINGLE_STAGE
    return PipeOps(layout.neighbour(rank, -1), layout.neighbour(rank, +1))


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldInfo:
    """Rank and world as the launcher (torchrun, Ray) gave them."""

    rank: int
    """global rank"""
    world_size: int
    """number of ranks"""
    local_rank: int
    """rank within this node"""


def world_from_env() -> WorldInfo:
    """Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (torchrun's variables); one rank if unset."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return WorldInfo(rank=rank, world_size=world, local_rank=local)


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

    @classmethod
    def connect(cls, world: WorldInfo, *, device: torch.device,
                timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> "Comm":
        """Joins (or reuses) the default process group; backend follows the device.

        Uses ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``) when no group exists yet.
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
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, timeout=timeout)
        return cls(rank=world.rank, world_size=world.world_size, device=device, owns_group=True, grouped=True)

    def close(self) -> None:
        """Stops failure watching and destroys the process group if this object created it."""
        self.stop_watch()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

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
                                       timeout=timeout)

    def stop_watch(self) -> None:
        """Stops the heartbeat (after the load's last collective)."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def publish_failure(self, err: DistloadError) -> None:
        """Tells every rank, out of band, that this rank failed with ``err``."""
        if self._watch is not None:
            self._watch.publish(self.rank, err, linger=2.0)

    def check_peers(self) -> None:
        """Raises PeerFailedError if another rank published a failure or fell silent."""
        if self._watch is not None:
            self._watch.check()

    def _collective(self, run: Callable[[], None]) -> None:
        """Runs one collective once every rank is ready for it, watching for failed peers.

        Ranks meet in the store first, so a collective only starts when all ranks have
        reached it: a failure before that leaves no operation pending, and the group
        can still be torn down at once (a pending gloo operation would hold it).
        """
        if self._watch is None:
            run()
            return
        self._watch.meet()
        try:
            run()
        except RuntimeError as err:  # a peer died inside the collective
            self._watch.await_failure(err)

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

    def pipe_ops(self, layout: Layout) -> PipeOps:
        """Returns this rank's hand-off to its neighbours in the pipeline."""
        return pipe_ops_for(layout, self.rank)

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
                group = dist.new_group(list(ranks))
                if ranks == mine and ops is not None:
                    ops.group = group

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sums an integer tensor over all ranks (the one tracking collective)."""
        if not self._grouped:
            return counts
        # a copy even on CPU (where .to() returns ``counts`` itself): all_reduce sums in
        # place, and the caller still needs its own record to name loaded_by afterwards
        on_device = counts.to(self.device, copy=True)
        self._collective(lambda: dist.all_reduce(on_device))
        return on_device.cpu()

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Stacks every rank's equally sized 1-D ``row`` into ``[world, len]``."""
        if not self._grouped:
            return row.unsqueeze(0)
        local = row.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        # the list form works on every backend and torch version
        self._collective(lambda: dist.all_gather(parts, local))
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


def _default_store():
    """The default group's rendezvous store, or None (a group made without one)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


class FailureWatch:
    """Out-of-band failure channel over the rendezvous store.

    A failing rank stores its error and bumps a shared counter; every rank polls that
    one counter while it waits. A background thread bumps this rank's heartbeat and
    watches the next rank's (a ring, so each rank reads one key): a rank silent for
    ``dead_after`` seconds (killed, or its host gone) is published as failed by its
    watcher. Keys carry a generation so consecutive loads on one group never mix.
    """

    def __init__(self, store, *, rank: int, world_size: int, dead_after: float, timeout: float) -> None:
        self.store, self.rank, self.world_size, self.dead_after = store, rank, world_size, dead_after
        self.timeout = timeout  # the longest wait for a rank that is alive but has not arrived
        # every rank adds once per load before any collective of that load completes
        self.prefix = f"distload/{(int(store.add('distload/generation', 1)) - 1) // world_size}/"
        self._stop = threading.Event()
        self._failed = False  # once a failure is known, the store may vanish: touch it no more
        self._meetings = 0
        self._watch_peer = True
        # the first beat before load() goes on: a peer that has never beaten has not started yet
        store.add(f"{self.prefix}beat/{rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="distload-heartbeat", daemon=True)
        self._thread.start()

    def publish(self, rank: int, err: DistloadError, *, linger: float = 0.0) -> None:
        """Stores ``err`` as rank ``rank``'s failure; with ``linger``, waits (bounded) until every
        other rank has read it or failed itself, since this process may host the store and exit next.

        Failures are numbered in the order they are published, so every rank reports the
        first one (the cause), not a later consequence of it.
        """
        self._failed = True
        try:
            order = int(self.store.add(f"{self.prefix}failed", 1))
            # plain JSON, never a pickle: the store is open to anyone who can reach it
            self.store.set(f"{self.prefix}error/{order}", json.dumps(
                {"rank": rank, "message": err.message, "file": err.file, "tensor": err.tensor}))
            deadline = time.monotonic() + linger
            # a rank that failed too never reads: counting it avoids waiting out the linger
            # when every rank fails alike (a bad checkpoint)
            while time.monotonic() < deadline and int(self.store.add(f"{self.prefix}seen", 0)) + \
                    int(self.store.add(f"{self.prefix}failed", 0)) < self.world_size:
                time.sleep(0.01)
        except Exception:  # the store itself is gone: peers will notice that instead
            pass

    def _add(self, key: str, amount: int) -> int:
        try:
            return int(self.store.add(key, amount))
        except Exception as err:  # the store's host (rank 0 without torchrun) is gone
            self._failed = True
            raise PeerFailedError(f"lost the rendezvous store ({type(err).__name__}: {err}); "
                                  "rank 0 or the launcher died", rank=self.rank) from None

    def _has(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception as err:
            self._failed = True
            raise PeerFailedError(f"lost the rendezvous store ({type(err).__name__}: {err}); "
                                  "rank 0 or the launcher died", rank=self.rank) from None

    def check(self) -> None:
        """Raises PeerFailedError if a rank published a failure (or the store is gone)."""
        if self._add(f"{self.prefix}failed", 0):
            self._failed = True
            err = self._first_error()
            try:
                self.store.add(f"{self.prefix}seen", 1)
            except Exception:
                pass
            raise err

    def await_failure(self, cause: Exception) -> None:
        """After a collective broke, waits (bounded) for the failure that explains it, and raises.

        A failing rank publishes before it closes its connections; a killed one is
        published by its watcher within ``dead_after``.
        """
        deadline = time.monotonic() + self.dead_after + 2.0
        while time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)
        err = PeerFailedError(f"a collective failed and no rank explained why: {cause}", rank=self.rank)
        self.publish(self.rank, err)  # so that no other rank waits for this one at the next meeting
        raise err

    def meet(self) -> None:
        """Returns once every rank has called ``meet`` as often as this one (a store barrier).

        The last rank to arrive sets a key; the others poll for it (backing off to 2 ms, or
        20 ms above 64 ranks), checking for failures between polls.
        """
        self._meetings += 1
        key = f"{self.prefix}meet/{self._meetings}"
        if self._add(key, 1) == self.world_size:
            self.store.set(f"{key}/all", b"1")
            return
        deadline = time.monotonic() + self.timeout
        # poll fast in small jobs; in large ones every waiting rank polling one store must back off
        cap = 0.002 if self.world_size <= 64 else 0.02
        pause = 0.0002
        while True:
            self.check()
            if self._has(f"{key}/all"):
                return
            time.sleep(pause)
            pause = min(pause * 2, cap)
            if time.monotonic() > deadline:  # alive (heartbeats) but stuck, e.g. a hung read
                arrived = self._add(key, 0)
                err = PeerFailedError(f"{self.world_size - arrived} rank(s) did not reach step {self._meetings} "
                                      f"within {self.timeout:.0f} s (a hung read or a stuck rank?)", rank=self.rank)
                self.publish(self.rank, err)
                raise err

    def stop(self) -> None:
        if not self._failed:
            self.mark_done()
        self._stop.set()
        # after a failure the thread may sit in a call to a store that is gone; it is a daemon
        self._thread.join(timeout=0.1 if self._failed else 5)

    def _first_error(self) -> PeerFailedError:
        try:  # the first failure's number is 1; its text follows its number by a moment
            deadline = time.monotonic() + 5.0
            while not self._has(f"{self.prefix}error/1") and time.monotonic() < deadline:
                time.sleep(0.01)
            err = json.loads(self.store.get(f"{self.prefix}error/1"))
            return PeerFailedError(str(err["message"]), file=err.get("file"), tensor=err.get("tensor"),
                                   rank=int(err["rank"]), failed_rank=int(err["rank"]))
        except Exception as exc:
            return PeerFailedError(f"another rank failed, but its error could not be read ({exc})", rank=self.rank)

    def _beat(self) -> None:
        peer = (self.rank + 1) % self.world_size
        interval = min(1.0, self.dead_after / 5)
        started = tick = time.monotonic()
        last_seen, since = 0, started
        while not self._stop.wait(interval):
            try:
                self.store.add(f"{self.prefix}beat/{self.rank}", 1)
                if not self._watch_peer or int(self.store.add(f"{self.prefix}done/{peer}", 0)):
                    continue  # the peer finished its load: silence is expected
                seen = int(self.store.add(f"{self.prefix}beat/{peer}", 0))
            except Exception:
                return  # store gone; check() on the main thread reports it
            now = time.monotonic()
            # a gap as long as the timeout itself means this process was not running: no verdict
            starved, tick = now - tick > self.dead_after, now
            if seen != last_seen or starved:  # after a stall of this process, silence proves nothing
                last_seen, since = seen, now
            elif seen == 0 and now - started < self.timeout:
                continue  # the peer has not started its load yet (ranks may call load() apart)
            elif now - since > self.dead_after:
                self.publish(peer, DistloadError(
                    f"rank {peer} stopped responding: no heartbeat for {now - since:.0f} s "
                    f"(killed, or its host is gone)", rank=peer))
                self._watch_peer = False  # keep beating: this rank is alive, and others watch it

    def mark_done(self) -> None:
        try:
            self.store.add(f"{self.prefix}done/{self.rank}", 1)
        except Exception:
            pass


def destroy_default_group() -> None:
    """Destroys the default process group if one exists (test harnesses, between jobs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
