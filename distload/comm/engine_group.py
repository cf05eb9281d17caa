"""Collectives over an engine's own process group, for ``distload.track``."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..errors import ConfigError, PeerFailedError


class GroupComm:
    """Collectives over a caller's process group, for ``distload.track``: the engine's world, or
    the group it passes. With no process group it is a group of one rank.

    ``ranks`` are the members' global ranks, in group order (reports name these).
    """

    def __init__(self, group: "dist.ProcessGroup | None" = None) -> None:
        self._grouped = dist.is_available() and dist.is_initialized()
        if not self._grouped:
            if group is not None:
                raise ConfigError("a process group was passed, but torch.distributed is not initialized")
            self.group, self.rank, self.size, self.ranks = None, 0, 1, (0,)
            self.device = torch.device("cpu")
            return
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        backend = str(dist.get_backend(group)).lower()
        self.device = _nccl_device(group) if "nccl" in backend else torch.device("cpu")

    def _run(self, call: Callable[[], object]) -> None:
        try:
            call()
        except RuntimeError as err:  # a member lost inside the collective
            raise PeerFailedError(f"a collective failed: {type(err).__name__}: {err}", rank=self.rank) from None

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Stacks every member's equally sized 1-D ``row`` into ``[size, len]`` (an all-gather)."""
        if self.size == 1:
            return row.unsqueeze(0)
        local = row.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._run(lambda: dist.all_gather(parts, local, group=self.group))
        return torch.stack(parts).cpu()

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        """Sums an integer tensor over the members (an all-reduce); ``counts`` is left as it was."""
        if self.size == 1:
            return counts.clone()
        on_device = counts.to(self.device, copy=True)
        self._run(lambda: dist.all_reduce(on_device, group=self.group))
        return on_device.cpu()

    def gather_objects(self, obj: object) -> list:
        """Gathers one small picklable object per member (names of what failed)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        self._run(lambda: dist.all_gather_object(out, obj, group=self.group))
        return out


def _nccl_device(group: "dist.ProcessGroup | None") -> torch.device:
    """The device an NCCL group's collectives run on: the one it was bound to
    (``init_process_group(device_id=...)``), else the current one, as torch's own object collectives
    take it. A tensor on another device would make NCCL a second communicator, for it alone."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    bound = pg.bound_device_id
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())
