"""What runs inside each rank's Ray actor in a ``distload.ray.load`` job: the load itself, the
model kept for forward passes, and summaries of its tensors for the driver."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import torch

from .comm import WorldInfo
from .config import LoadConfig
from .errors import DistloadError
from .models import ModelBuilder
from .report import LoadReport


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamChecksum:
    """One tensor of a rank's state dict, summarized."""

    sum: float
    """the sum of its values in float64 (comparable with the checkpoint tensor's, or its shard's)"""
    sha256: str
    """SHA-256 of its bytes: equal only for bit-identical tensors"""


class RankActor:
    """One rank of a ``load`` job (made a Ray actor by ``load``): loads with ``distload.load``
    and keeps the model for forward passes until ``close``."""

    def __init__(self) -> None:
        self._loaded = None

    def where(self) -> tuple[str, str, int, int]:
        """This actor's node id, node IP, a port free there, and its process id."""
        import ray
        addr, port = node_address()
        return ray.get_runtime_context().get_node_id(), addr, port, os.getpid()

    def load(self, checkpoint: str, config: LoadConfig, world: WorldInfo, build: ModelBuilder,
             progress: bool) -> tuple[LoadReport | None, DistloadError | None]:
        """Loads this rank's shard, keeping the group open; returns (report, None) or (None, error)."""
        import distload
        from .progress import Progress
        try:
            self._loaded = distload.load(checkpoint, config, world=world, build=build, keep_group=True,
                                         progress=Progress() if progress else None)
        except DistloadError as err:
            return None, err.with_rank(world.rank)
        return self._loaded.report, None

    def forward(self, input_ids: torch.Tensor, want: bool) -> torch.Tensor | None:
        """Runs this rank's part of the forward pass; returns the logits if ``want``."""
        with torch.no_grad():
            out = self._loaded.model(input_ids)
        return out if want else None

    def checksums(self) -> dict[str, ParamChecksum]:
        return {name: _checksum(t) for name, t in self._loaded.model.state_dict().items()}

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None


def node_address() -> tuple[str, int]:
    """This node's IP as Ray names it, and a TCP port free on it a moment ago."""
    import ray
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _checksum(t: torch.Tensor) -> ParamChecksum:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return ParamChecksum(sum=float(flat.double().sum()), sha256=hashlib.sha256(
        flat.view(torch.uint8).numpy().tobytes()).hexdigest())
