"""Where this rank sits: rank and world as the launcher (torchrun, Ray) gave them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldInfo:
    """Rank and world as the launcher (torchrun, Ray) gave them."""

    rank: int
    """global rank"""
    world_size: int
    """number of ranks"""
    local_rank: int
    """rank within this node"""
    local_world_size: int = 1
    """ranks on this node (torchrun's LOCAL_WORLD_SIZE): they share its cores"""
    master_addr: str | None = None
    """rank 0's host for the rendezvous (with ``master_port``); None: ``MASTER_ADDR`` from the environment"""
    master_port: int | None = None
    """a free TCP port on ``master_addr``, where rank 0 serves the rendezvous store; None: ``MASTER_PORT``"""


def world_from_env() -> WorldInfo:
    """Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (torchrun's variables); one rank if unset."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return WorldInfo(rank=rank, world_size=world, local_rank=local, local_world_size=max(1, local_world))
