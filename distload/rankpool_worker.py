"""What each worker process of a ``RankPool`` runs: one rank of a job per task, with the job's
environment, its answer pickled back through the worker's own pipe."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import traceback
from multiprocessing.connection import Connection

from .rankpool import RankFailed


def serve(conn: Connection, once: bool) -> None:
    """A worker's life: answers ``ready``, then runs one rank of a job per task until told to
    stop (``None``), the parent is gone, or (``once``) after one task."""
    import torch  # imported once, here, so that jobs start fast

    torch.set_num_threads(1)  # one intra-op thread per rank, as torchrun sets it
    try:
        conn.send_bytes(pickle.dumps("ready"))
    except OSError:  # the parent is gone
        return
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone: nobody to answer
            return
        if task is None:
            _quick_exit()
        job, rank, world, port, call, env, device = task
        ok, value, tb = _run_one(rank, world, port, call, env, device)
        try:
            try:
                answer = pickle.dumps((job, ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as err:
                answer = pickle.dumps((job, False, RankFailed(f"rank {rank}: the job returned a value that "
                                                              f"cannot be pickled: {err}", rank=rank), ""))
            conn.send_bytes(answer)
        except OSError:  # the parent is gone
            return
        if once:
            _quick_exit()


def _quick_exit() -> None:
    """Ends this worker without the interpreter's teardown (torch's takes seconds per process on
    a busy machine, and a pool closes many): nothing is left to flush but stdout and stderr."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _run_one(rank: int, world: int, port: int, call: bytes, env: dict, device: str) -> tuple:
    """Runs one rank of a job (``call``: the pickled function and arguments) in this worker;
    returns (ok, value or error, traceback)."""
    names = (*env, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       **env})
    try:
        if device == "cuda":
            import torch
            torch.cuda.set_device(rank)
        fn, args = pickle.loads(call)
        return True, fn(*args), ""
    except BaseException as err:  # report everything; the caller decides
        tb = traceback.format_exc()
        with contextlib.suppress(AttributeError, TypeError):  # the traceback travels in the error's notes
            err.__notes__ = [*getattr(err, "__notes__", ()), f"traceback of rank {rank}:\n{tb}"]
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:
            err = RankFailed(f"rank {rank}: {type(err).__name__}: {err} (the error cannot be pickled)\n{tb}",
                             rank=rank, traceback=tb)
        return False, err, tb
    finally:
        from .comm import destroy_default_group
        destroy_default_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
