"""Rank jobs that fail on purpose (importable by the pool's workers)."""

from __future__ import annotations

import os
import signal
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
                "seconds": time.monotonic() - start, "finished_at": time.time()}


def fail_while_reading(directory: str, tp: int, victim: int, how: str, failure_timeout: float,
                       stamp: str | None = None):
    """Rank ``victim`` raises (``how='raise'``) or is SIGKILLed (``how='kill'``) after its first read;
    before a kill it writes the time to ``stamp``."""
    rank = int(os.environ["RANK"])

    def progress(done: int, total: int) -> None:
        if rank == victim:
            if how == "kill":
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            raise distload.CheckpointError("injected read failure", file="injected.safetensors",
                                           tensor="model.norm.weight")

    cfg = distload.LoadConfig(tp=tp, device="cpu", failure_timeout=failure_timeout)
    return _outcome(lambda: distload.load(directory, cfg, progress=progress))


def fail_while_building(directory: str, tp: int, victim: int):
    """Rank ``victim`` fails before any data is read (in its model builder)."""
    rank = int(os.environ["RANK"])

    def build(ctx):
        if rank == victim:
            raise distload.PlanError("injected planning failure", tensor="model.embed_tokens.weight")
        return reference_model(ctx)

    return _outcome(lambda: distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"), build=build))


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

