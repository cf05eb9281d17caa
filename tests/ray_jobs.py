"""What the Ray tests run inside actors (importable by Ray's workers): a builder that kills its
rank, and an engine's own actor class with its own module, loaded through ``distload.load``, or
with the engine-style loader's own loop recorded and merged by ``distload.track``."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

import distload
from distload.layers import ColumnParallelLinear, Part, RowParallelLinear
from distload.models import reference_model
from distload.spec import ParamSpec, Role, Source, SpecProvider


def kill_rank(ctx: distload.BuildContext, *, victim: int, pid_dir: str) -> nn.Module:
    """A builder that records each rank's process id, and SIGKILLs rank ``victim`` mid-load
    (its failure watch is already running), after writing the time to ``pid_dir/killed-at``."""
    with open(os.path.join(pid_dir, f"rank-{ctx.rank}"), "w") as f:
        f.write(str(os.getpid()))
    if ctx.rank == victim:
        with open(os.path.join(pid_dir, "killed-at"), "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return reference_model(ctx)


class Scaled(nn.Module, SpecProvider):
    """A parameter that may be absent from the checkpoint (default 1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty((), device="meta"))

    def param_specs(self, path):
        name = f"{path}.scale"
        yield ParamSpec(name=name, shape=(), role=Role.OPTIONAL, default=1.0, sources=(Source(name=name, shape=()),))


class EngineMLP(nn.Module):
    """The engine's own model (not one of distload's reference models), split over TP ranks."""

    def __init__(self, ctx: distload.BuildContext) -> None:
        super().__init__()
        h, f = ctx.config["hidden"], ctx.config["ffn"]
        self.norm = nn.LayerNorm(h, device="meta")
        self.up = ColumnParallelLinear(h, [Part(name="", out_features=f, num_shards=ctx.tp)], tp=ctx.tp, device="meta")
        self.down = RowParallelLinear(f, h, tp=ctx.tp, ops=ctx.ops, device="meta")
        self.out = Scaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x)))) * self.out.scale


def engine_mlp_config(world_size: int) -> distload.LoadConfig:
    """What an engine worker loads ``EngineMLP`` with: TP over every rank, on the CPU."""
    return distload.LoadConfig(tp=world_size, device="cpu")


def engine_mlp_report(checkpoint: str) -> dict:
    """A pool job: ``EngineMLP`` loaded by ``distload.load`` under torchrun's variables, as the
    engine actors load it; the report JSON (also of an incomplete checkpoint)."""
    world = distload.comm.world_from_env()
    try:
        return distload.load(checkpoint, engine_mlp_config(world.world_size), build=EngineMLP).report.to_json()
    except distload.MissingWeightsError as err:
        return err.report.to_json()


class EngineWorker:
    """A serving engine's worker actor: it loads its own module with ``distload.load``, given the
    ``WorldInfo`` from ``distload.ray.rendezvous``, and keeps it for forward passes."""

    def __init__(self) -> None:
        self.loaded = None

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def load(self, checkpoint: str, world: distload.WorldInfo) -> dict:
        """``distload.load(build=EngineMLP, world=...)``; an incomplete checkpoint's report (no model) too."""
        try:
            self.loaded = distload.load(checkpoint, engine_mlp_config(world.world_size), world=world,
                                        build=EngineMLP, keep_group=True)
        except distload.MissingWeightsError as err:
            return err.report.to_json()
        return self.loaded.report.to_json()

    def track(self, checkpoint: str, layout: dict, world: distload.WorldInfo) -> dict:
        """The engine-style model of ``tests.engine_loader`` loaded by its own loop, recorded with
        ``distload.track`` and merged across the actors through ``track.merge(world=...)``."""
        from tests.track_jobs import engine_track
        return engine_track(checkpoint, layout, world=world)["report"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.loaded.model(x)

    def close(self) -> None:
        self.loaded.close()
