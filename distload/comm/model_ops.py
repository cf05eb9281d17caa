"""Collectives the models run in their forward: sums and gathers over a TP group, and the
hand-off between pipeline stages."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import DistloadError
from ..layout import Layout


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
