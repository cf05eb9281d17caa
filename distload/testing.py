"""Multi-rank test harness: a pool of long-lived worker processes that run a function on
N ranks of a fresh gloo job each time (importing torch once per worker, not per test).

Example:
    >>> pool = RankPool(2)                      # doctest: +SKIP
    >>> pool.run(2, my_module.job, "arg")       # doctest: +SKIP
    [result_of_rank_0, result_of_rank_1]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(Exception):
    """A rank raised something that is not a DistloadError (a bug, not a finding)."""


class WorkerDied(Exception):
    """A rank's worker process ended (killed) before returning; it is replaced."""


def _worker(tasks: "mp.Queue", results: "mp.Queue") -> None:
    import torch  # imported once, here, so that jobs start fast

    torch.set_num_threads(1)  # one intra-op thread per rank, as torchrun sets it

    while True:
        task = tasks.get()
        if task is None:
            return
        job, rank, world, port, fn, args, env = task
        saved = {k: os.environ.get(k) for k in (*env, "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                 "MASTER_ADDR", "MASTER_PORT")}
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env})
        try:
            results.put((job, rank, True, fn(*args)))
        except BaseException as err:  # report everything; the test decides
            from .errors import DistloadError
            payload = err if isinstance(err, DistloadError) else RankFailed(
                f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
            try:
                results.put((job, rank, False, payload))
            except Exception:
                results.put((job, rank, False, RankFailed(f"rank {rank}: unpicklable {err!r}")))
        finally:
            from .comm import destroy_default_group
            destroy_default_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class RankPool:
    """``size`` spawned workers; ``run(world, fn, *args)`` runs ``fn`` on ranks 0..world-1.

    ``fn`` must be importable (a module-level function); it sees torchrun's variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a new job.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._ctx = mp.get_context("spawn")
        self._job = 0
        self._start()

    def _start(self) -> None:
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.size)]
        self._procs = [self._ctx.Process(target=_worker, args=(q, self._results), daemon=True)
                       for q in self._tasks]
        for p in self._procs:
            p.start()

    def run(self, world: int, fn: Callable, *args: Any, env: dict[str, str] | None = None,
            timeout: float = 180.0, raise_errors: bool = False) -> list:
        """Runs ``fn(*args)`` on ``world`` ranks; returns results (or the exception) per rank.

        Args:
            raise_errors: re-raise the first rank's exception instead of returning it.
        """
        if world > self.size:
            raise ValueError(f"pool has {self.size} workers, asked for world {world}")
        self._job += 1
        port = free_port()
        for rank in range(world):
            self._tasks[rank].put((self._job, rank, world, port, fn, args, dict(env or {})))
        out: list = [None] * world
        pending = set(range(world))
        deadline = time.monotonic() + timeout
        while pending:
            try:
                job, rank, ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                for rank in sorted(pending):
                    if not self._procs[rank].is_alive():  # killed: it will never answer
                        out[rank] = WorkerDied(f"rank {rank}'s worker died (exit code {self._procs[rank].exitcode})")
                        pending.discard(rank)
                        self._replace(rank)
                if time.monotonic() > deadline:
                    self.restart()
                    raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks within {timeout} s") from None
                continue
            if job != self._job or rank not in pending:
                continue
            out[rank] = value
            pending.discard(rank)
        for value in out:
            if isinstance(value, RankFailed) or (raise_errors and isinstance(value, BaseException)):
                raise value
        return out

    def _replace(self, rank: int) -> None:
        self._tasks[rank] = self._ctx.Queue()
        self._procs[rank] = self._ctx.Process(target=_worker, args=(self._tasks[rank], self._results), daemon=True)
        self._procs[rank].start()

    def restart(self) -> None:
        """Kills every worker and starts fresh ones (after a hang)."""
        for p in self._procs:
            p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._start()

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
