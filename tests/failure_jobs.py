"""Rank jobs that fail on purpose (importable by the pool's workers)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import distload
from distload.models import reference_model


def _outcome(fn):
    start = time.monotonic()
    try:
        fn()
        return {"ok": True, "seconds": time.monotonic() - start}
    except distload.DistloadError as err:
        return {"ok": False, "type": type(err).__name__, "message": str(err), "rank": err.rank,
                "failed_rank": getattr(err, "failed_rank", None), "file": err.file, "tensor": err.tensor,
                "lost_ranks": list(getattr(err, "lost_ranks", ())),
                "seconds": time.monotonic() - start, "finished_at": time.time()}


def fail_while_reading(directory: str, tp: int, victim: int, how: str, failure_timeout: float,
                       stamp: str | None = None, device: str = "cpu"):
    """Rank ``victim`` raises (``how='raise'``), is SIGKILLed (``how='kill'``) or SIGSTOPped
    (``how='stop'``; it raises if continued) after its first read, or, as it enters the first
    collective (the others are in it: every rank met first), SIGSTOPs itself
    (``stop-in-collective``: plain processes only, never the pool's), SIGKILLs itself
    (``kill-in-collective``) or raises (``raise-in-collective``); before a kill or a stop it
    writes the time to ``stamp``. ``device``: ``cuda`` loads on this rank's GPU, with NCCL."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])

    def progress(done: int, total: int) -> None:
        if rank == victim:
            if how in ("kill", "stop"):
                _stop_here(stamp, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            raise distload.CheckpointError("injected read failure", file="injected.safetensors",
                                           tensor="model.norm.weight")

    gather = dist.all_gather
    if how.endswith("-in-collective") and rank == victim:

        def fail_then_gather(*args, **kwargs):
            if how == "raise-in-collective":
                raise distload.CheckpointError("injected failure in a collective", file="injected.safetensors")
            _stop_here(stamp, signal.SIGSTOP if how == "stop-in-collective" else signal.SIGKILL)
            return gather(*args, **kwargs)
        dist.all_gather = fail_then_gather
    cfg = distload.LoadConfig(tp=tp, device=device, failure_timeout=failure_timeout)
    try:
        return _outcome(lambda: distload.load(directory, cfg, progress=progress))
    finally:
        dist.all_gather = gather  # a pool's worker runs other jobs next


def _stop_here(stamp: str, sig: int) -> None:
    """Writes the time to ``stamp``, then sends this process ``sig``."""
    with open(stamp, "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), sig)


def fail_while_building(directory: str, tp: int, victim: int, late: int | None = None, late_s: float = 0.0,
                        failure_timeout: float = 30.0, late_at: str = "build"):
    """Rank ``victim`` fails before any data is read (in its model builder); rank ``late`` spends
    ``late_s`` seconds first (a rank far behind the others): in its builder (``late_at='build'``,
    its failure watch already running), or before its failure watch starts (``'watch'``)."""
    rank = int(os.environ["RANK"])
    if rank == late and late_at == "watch":
        from distload.comm import Comm

        start = Comm.start_watch

        def start_late(self, **kwargs):
            time.sleep(late_s)
            return start(self, **kwargs)
        Comm.start_watch = start_late  # this pool worker's own class: restored below
        try:
            return fail_while_building(directory, tp, victim, None, 0.0, failure_timeout)
        finally:
            Comm.start_watch = start

    def build(ctx):
        if rank == victim:
            raise distload.PlanError("injected planning failure", tensor="model.embed_tokens.weight")
        if rank == late:
            time.sleep(late_s)
        return reference_model(ctx)

    config = distload.LoadConfig(tp=tp, device="cpu", failure_timeout=failure_timeout)
    return _outcome(lambda: distload.load(directory, config, build=build))


def load_per_rank_checkpoint(directories: list[str], tp: int, **options):
    """Each rank loads its own entry of ``directories`` (ranks that disagree)."""
    rank = int(os.environ["RANK"])
    cfg = distload.LoadConfig(tp=tp, device="cpu", **options)
    return _outcome(lambda: distload.load(directories[rank], cfg))



def load_with_options(directory: str, per_rank: dict):
    """Loads with LoadConfig options that may differ per rank: ``per_rank[rank]`` (or ``per_rank['*']``)."""
    rank = int(os.environ["RANK"])
    options = {"device": "cpu", **per_rank.get("*", {}), **per_rank.get(rank, {})}
    return _outcome(lambda: distload.load(directory, distload.LoadConfig(**options)))


def load_with_version(directory: str, tp: int, versions: dict):
    """Rank r pretends to run distload ``versions[r]`` (default: the real one)."""
    import distload.api
    rank = int(os.environ["RANK"])
    real = distload.api.__version__
    distload.api.__version__ = versions.get(rank, real)
    try:
        return _outcome(lambda: distload.load(directory, distload.LoadConfig(tp=tp, device="cpu")))
    finally:
        distload.api.__version__ = real


if __name__ == "__main__":
    # one rank of a launch without torchrun or the pool (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    # environment): ``python -m tests.failure_jobs '{"directory": ...}'`` prints its outcome as JSON
    print(json.dumps(fail_while_reading(**json.loads(sys.argv[1]))), flush=True)
