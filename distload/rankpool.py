"""The machinery of ``distload.testing``: a pool of worker processes that run a function on N
ranks of a new job per call, and what comes back from each rank (see ``distload.testing``).

Each worker has its own pipe, so a killed one loses only its own answer; answers are matched
to calls by a job number, so a late answer of an abandoned call is never taken for a new one.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

DEVICES = ("auto", "cpu", "cuda")
"""where ranks run: ``cpu`` (gloo), ``cuda`` (NCCL, one GPU per rank)"""


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(Exception):
    """A rank raised something that is not a DistloadError (a bug, not a finding); the message
    ends with that rank's traceback."""

    def __init__(self, message: str, *, rank: int | None = None, traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.traceback = traceback


class WorkerDied(Exception):
    """A rank's worker process ended (killed) before returning; it is replaced."""

    def __init__(self, message: str, *, rank: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode


class RankTimeout(TimeoutError):
    """Some ranks had not returned at the timeout; their workers were killed (``ranks`` names them)."""

    def __init__(self, message: str, *, ranks: tuple[int, ...] = (), timeout: float | None = None) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.timeout = timeout


@dataclass(frozen=True, kw_only=True, slots=True)
class RankResult:
    """What one rank of a call gave back."""

    rank: int
    """the global rank"""
    value: Any = None
    """``fn``'s return value (None when it raised)"""
    error: BaseException | None = None
    """what it raised, or ``WorkerDied`` / ``RankTimeout`` when its process was lost or killed"""
    traceback: str = ""
    """the rank's formatted traceback of ``error`` (empty when its process did not report one)"""

    @property
    def ok(self) -> bool:
        """True when ``fn`` returned."""
        return self.error is None


def load_report(checkpoint: str, config=None):
    """A job for ``RankPool.run``: ``distload.load`` on this rank; returns the job's ``LoadReport``.

    An incomplete checkpoint returns its report too (``report.ok`` is False), so a test can print
    what is missing; any other failure raises.
    """
    from .api import load
    from .config import LoadConfig
    from .errors import MissingWeightsError

    try:
        return load(checkpoint, config if config is not None else LoadConfig()).report
    except MissingWeightsError as err:
        return err.report


class RankPool:
    """Worker processes that run a function on ranks 0..world-1, one new job per call.

    ``fn`` must be importable (a module-level function; a test file's own functions are,
    under pytest's default import mode). It sees torchrun's variables for a new job
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``), so ``distload.load`` or ``torch.distributed.init_process_group()`` forms
    the group; whatever default group is left is destroyed after the call.

    Args:
        size: the number of workers, the largest world a call can ask for.
        device: ``cpu`` (gloo), ``cuda`` (one visible GPU per rank, ``torch.cuda.set_device
            (LOCAL_RANK)`` before ``fn``, and distload's loads use NCCL), or ``auto``: ``cuda``
            when at least ``size`` GPUs are visible, else ``cpu``.
        timeout: default seconds a call may take before its unfinished ranks are killed (counted
            once its workers have started: a worker's start, torch's import, is not timed).
        fresh_processes: start ``world`` new processes for every call (and end them after it)
            instead of keeping ``size`` workers between calls.

    Raises:
        ConfigError: an unknown device, or ``cuda`` with fewer visible GPUs than ``size``.
    """

    def __init__(self, size: int, *, device: str = "auto", timeout: float = 180.0,
                 fresh_processes: bool = False) -> None:
        from .errors import ConfigError

        if device not in DEVICES:
            raise ConfigError(f"RankPool device must be one of {', '.join(DEVICES)}, not {device!r}")
        if device != "cpu":
            import torch
            if device == "auto":
                device = "cuda" if torch.cuda.device_count() >= size else "cpu"
            elif torch.cuda.device_count() < size:
                raise ConfigError(f"RankPool(device='cuda') of {size} ranks needs {size} visible GPUs, "
                                  f"found {torch.cuda.device_count()}")
        self.size = size
        self.device = device
        self.timeout = timeout
        self.fresh_processes = fresh_processes
        self._ctx = mp.get_context("spawn")  # torch and fork do not mix
        self._job = 0
        self._procs: list = [None] * size
        self._conns: list[Connection | None] = [None] * size
        self._ready = [False] * size  # the worker said it imported torch and waits for tasks
        if not fresh_processes:
            for rank in range(size):
                self._spawn(rank)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers (none between the calls of a fresh-process pool)."""
        return [p.pid for p in self._procs if p is not None and p.is_alive()]

    def run(self, world: int, fn: Callable, *args: Any, env: dict[str, str] | None = None,
            timeout: float | None = None, raise_errors: bool = False) -> list:
        """Runs ``fn(*args)`` on ``world`` ranks; returns each rank's value, in rank order.

        A rank that raised a ``DistloadError`` gives that error as its value (tests of failures
        inspect it), a lost worker a ``WorkerDied``; a rank's traceback is in the error's notes.

        Args:
            env: more environment variables for every rank of this call.
            timeout: seconds (default: the pool's) before unfinished ranks are killed.
            raise_errors: raise the first rank's error instead of returning it.

        Returns:
            One entry per rank: its return value or its error.

        Raises:
            RankFailed: a rank raised anything other than a ``DistloadError`` (after every rank ended).
            RankTimeout: ranks still running at the timeout; they were killed (and replaced).
        """
        results = self.results(world, fn, *args, env=env, timeout=timeout)
        timed_out = [r for r in results if isinstance(r.error, RankTimeout)]
        if timed_out:
            raise timed_out[0].error
        from .errors import DistloadError
        for r in results:
            if r.error is not None and (raise_errors or not isinstance(r.error, (DistloadError, WorkerDied))):
                if isinstance(r.error, (DistloadError, WorkerDied, RankFailed)):
                    raise r.error
                raise RankFailed(f"rank {r.rank}: {type(r.error).__name__}: {r.error}\n{r.traceback}",
                                 rank=r.rank, traceback=r.traceback) from r.error
        return [r.value if r.ok else r.error for r in results]

    def load(self, checkpoint: str, config=None, *, world: int | None = None,
             timeout: float | None = None):
        """Loads ``checkpoint`` with ``distload.load`` on ``world`` ranks (default: the pool's size).

        A ``config`` without a device loads on the pool's (``cpu``: gloo, ``cuda``: NCCL).

        Returns:
            Rank 0's ``LoadReport`` of the job, also when units are missing (``report.ok`` False).

        Raises:
            DistloadError: any other failure of the load (the first rank's, in rank order).
            RankTimeout: the load did not finish within the timeout.
        """
        import dataclasses

        from .config import LoadConfig

        config = config if config is not None else LoadConfig()
        if config.device is None:
            config = dataclasses.replace(config, device=self.device)
        return self.run(self.size if world is None else world, load_report, checkpoint, config,
                        timeout=timeout, raise_errors=True)[0]

    def results(self, world: int, fn: Callable, *args: Any, env: dict[str, str] | None = None,
                timeout: float | None = None) -> list[RankResult]:
        """Runs ``fn(*args)`` on ``world`` ranks and returns a ``RankResult`` per rank; never raises
        for what a rank did: a rank killed at the timeout has a ``RankTimeout`` as its error.

        Raises:
            ValueError: ``world`` is larger than the pool.
            pickle.PicklingError, TypeError, AttributeError: ``fn`` or ``args`` cannot be pickled.
        """
        if not 1 <= world <= self.size:
            raise ValueError(f"pool has {self.size} workers, asked for world {world}")
        timeout = self.timeout if timeout is None else timeout
        # pickled once, here: a function that cannot be pickled fails before any rank starts,
        # and one that cannot be imported fails in each rank, with its traceback. Plain pickle,
        # not multiprocessing's: that one shares a tensor's memory through a handle only one
        # process can redeem, or that dies with a worker that ends after answering
        job = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        self._job += 1
        for rank in range(world):
            if self.fresh_processes or not self._procs[rank].is_alive():  # (a worker lost between calls)
                self._spawn(rank, once=self.fresh_processes)
        self._await_ready(world)  # the timeout bounds the call, not a worker's start
        port = free_port()
        for rank in range(world):
            with contextlib.suppress(OSError):  # a worker that died just now: collected as WorkerDied
                self._conns[rank].send((self._job, rank, world, port, job, dict(env or {}), self.device))
        try:
            return self._collect(world, fn, timeout)
        finally:
            if self.fresh_processes:
                self._end(range(world))

    def _await_ready(self, world: int, *, bound: float = 300.0) -> None:
        """Waits until ranks 0..world-1 have started.

        Raises:
            WorkerDied: a worker ended while it started (it is replaced for the next call).
            RankTimeout: a worker did not start within ``bound`` seconds.
        """
        deadline = time.monotonic() + bound
        for rank in range(world):
            conn, proc = self._conns[rank], self._procs[rank]
            while not self._ready[rank]:
                if not wait([conn, proc.sentinel], timeout=max(0.0, deadline - time.monotonic())):
                    raise RankTimeout(f"rank {rank}'s worker did not start within {bound:g} s", ranks=(rank,),
                                      timeout=bound)
                try:
                    self._ready[rank] = conn.poll() and pickle.loads(conn.recv_bytes()) == "ready"
                except (EOFError, OSError):  # its end of the pipe closed: it is ending
                    proc.join(10)
                if not self._ready[rank] and not proc.is_alive():
                    proc.join()
                    code = proc.exitcode
                    if not self.fresh_processes:
                        self._spawn(rank)
                    raise WorkerDied(f"rank {rank}'s worker died while starting (exit code {code})", rank=rank,
                                     exitcode=code)

    def _collect(self, world: int, fn: Callable, timeout: float) -> list[RankResult]:
        out: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout
        while len(out) < world:
            pending = [r for r in range(world) if r not in out]
            waiting = {self._conns[r]: r for r in pending} | {self._procs[r].sentinel: r for r in pending}
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for rank in sorted({waiting[obj] for obj in ready}):
                result = self._receive(rank)
                if result is not None:
                    out[rank] = result
        hung = [r for r in range(world) if r not in out]
        if hung:
            pids = [self._procs[r].pid for r in hung]
            self._end(hung, kill=True)
            names = ", ".join(map(str, hung))
            many = "s" if len(hung) > 1 else ""
            err = RankTimeout(f"rank{many} {names} of {world} did not finish {getattr(fn, '__qualname__', fn)} "
                              f"within {timeout:g} s: killed (pid{many} {', '.join(map(str, pids))})",
                              ranks=tuple(hung), timeout=timeout)
            for r in hung:
                out[r] = RankResult(rank=r, error=err)
                if not self.fresh_processes:
                    self._spawn(r)
        return [out[r] for r in range(world)]

    def _receive(self, rank: int) -> RankResult | None:
        """This rank's answer; a ``WorkerDied`` result when its process ended without one; None
        while it is still running."""
        conn, proc = self._conns[rank], self._procs[rank]
        try:
            answer = pickle.loads(conn.recv_bytes()) if conn.poll() else None
        except (EOFError, OSError):  # it died while writing
            answer = None
        except Exception as err:  # an answer this process cannot unpickle
            return RankResult(rank=rank, error=RankFailed(f"rank {rank}: its answer cannot be unpickled here: "
                                                          f"{type(err).__name__}: {err}", rank=rank))
        if answer is not None:
            job, ok, value, tb = answer
            if job == self._job:
                return RankResult(rank=rank, value=value) if ok else RankResult(rank=rank, error=value, traceback=tb)
            return None  # an answer of an earlier, abandoned call
        if proc.is_alive():
            return None
        proc.join()
        died = WorkerDied(f"rank {rank}'s worker died (exit code {proc.exitcode})", rank=rank,
                          exitcode=proc.exitcode)
        if not self.fresh_processes:
            self._spawn(rank)
        return RankResult(rank=rank, error=died)

    def _spawn(self, rank: int, *, once: bool = False) -> None:
        if self._procs[rank] is not None:  # a lost worker's remains
            self._procs[rank].kill()
            self._procs[rank].join()
            self._conns[rank].close()
        parent, child = self._ctx.Pipe()
        from .rankpool_worker import serve  # the workers' side (imports torch, in them only)

        proc = self._ctx.Process(target=serve, args=(child, once), daemon=True,
                                 name=f"distload-rank-{rank}")
        proc.start()
        child.close()  # the worker holds the other end: its death closes the pipe here
        self._procs[rank], self._conns[rank], self._ready[rank] = proc, parent, False

    def _end(self, ranks, *, kill: bool = False, grace: float = 10.0) -> None:
        """Ends these ranks' workers (asked to stop, or killed) and reaps them: no process is left."""
        for rank in ranks:
            proc, conn = self._procs[rank], self._conns[rank]
            if proc is None:
                continue
            if kill:
                proc.kill()
            else:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(None)
        deadline = time.monotonic() + grace
        for rank in ranks:
            proc, conn = self._procs[rank], self._conns[rank]
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
            self._procs[rank] = self._conns[rank] = None

    def restart(self) -> None:
        """Kills every worker and starts fresh ones."""
        self._end(range(self.size), kill=True)
        if not self.fresh_processes:
            for rank in range(self.size):
                self._spawn(rank)

    def close(self) -> None:
        """Stops every worker and waits for it to exit (killing one that does not within 10 s)."""
        self._end(range(self.size))
