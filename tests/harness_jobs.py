"""Jobs for the harness tests (tests/test_harness.py): importable, so pool workers can run them."""

from __future__ import annotations

import os
import time


def _explode(rank: int) -> None:
    raise ValueError(f"boom on rank {rank}")


def raise_on(victim: int) -> int:
    """Returns the rank; ``victim`` raises a ValueError from a nested call instead."""
    rank = int(os.environ["RANK"])
    if rank == victim:
        _explode(rank)
    return rank


def raise_distload_error(victim: int) -> int:
    """Returns the rank; ``victim`` raises a CheckpointError (a finding, returned as a value)."""
    from distload.errors import CheckpointError

    rank = int(os.environ["RANK"])
    if rank == victim:
        raise CheckpointError("injected", file="x.safetensors", rank=rank)
    return rank


def hang_on(victim: int) -> int:
    """Returns this worker's pid; ``victim`` never returns."""
    if int(os.environ["RANK"]) == victim:
        while True:
            time.sleep(1)
    return os.getpid()


def identity() -> dict:
    """This rank's process id and torchrun variables."""
    return {"pid": os.getpid(), **{k: os.environ.get(k) for k in
                                   ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "EXTRA")}}


def all_reduce_ranks() -> int:
    """Forms a gloo group from the harness's variables and sums the ranks over it."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return int(t)


def cuda_identity() -> tuple[int, int, str]:
    """LOCAL_RANK, the current CUDA device and the group's backend, after a NCCL all-reduce."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    return int(os.environ["LOCAL_RANK"]), torch.cuda.current_device(), dist.get_backend()


def scaled(t):
    """``t`` times (rank + 1): a tensor in and a tensor out."""
    return t * (int(os.environ["RANK"]) + 1)
