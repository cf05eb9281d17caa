"""The only module that talks to torch.distributed.

Everything above it (planning, tracking, models) calls these small wrappers, so
the backend (gloo on CPU, NCCL on CUDA) and process-group handling live here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError
from .layout import Layout


class Collectives:
    """Tensor collectives over one group of ranks; with one rank they are identities."""

    def __init__(self, group: "dist.ProcessGroup | None" = None, size: int = 1) -> None:
        self.group = group
        self.size = size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the group, in place, and returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenates every rank's ``tensor`` along ``dim``, in group order."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


SOLO = Collectives()
"""Collectives of a group of one rank (no process group needed)."""


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
        """Destroys the process group if this object created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def tp_collectives(self, layout: Layout) -> Collectives:
        """Returns collectives over this rank's tensor-parallel group.

        Every rank creates every TP group, in the same order, as torch.distributed requires.
        """
        if layout.tp == 1:
            return SOLO
        if layout.tp == self.world_size:
            return Collectives(None, layout.tp)
        mine = layout.tp_group(self.rank)
        if mine not in self._tp:
            for ranks in layout.tp_groups():
                group = dist.new_group(list(ranks))
                if ranks == mine:
                    self._tp[mine] = Collectives(group, layout.tp)
        return self._tp[mine]

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sums an integer tensor over all ranks (the one tracking collective)."""
        if not self._grouped:
            return counts
        # a copy even on CPU (where .to() returns ``counts`` itself): all_reduce sums in
        # place, and the caller still needs its own record to name loaded_by afterwards
        on_device = counts.to(self.device, copy=True)
        dist.all_reduce(on_device)
        return on_device.cpu()

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Stacks every rank's equally sized 1-D ``row`` into ``[world, len]``."""
        if not self._grouped:
            return row.unsqueeze(0)
        local = row.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)  # the list form works on every backend and torch version
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
