"""The only package that talks to torch.distributed.

Everything above it (planning, tracking, models) calls these small wrappers, so the backend
(gloo on CPU, NCCL on CUDA) and process-group handling live here: ``world`` (where this rank
sits), ``model_ops`` (the models' collectives), ``load_group`` (the load's group, its merge
collectives and failure watch), ``engine_group`` (an engine's group, for ``distload.track``).
"""

from .engine_group import GroupComm
from .load_group import ABORT_WAIT, Comm, destroy_default_group
from .model_ops import SINGLE_STAGE, SOLO, Collectives, PipeOps, pipe_ops_for
from .world import WorldInfo, world_from_env

__all__ = ["ABORT_WAIT", "SINGLE_STAGE", "SOLO", "Collectives", "Comm", "GroupComm", "PipeOps", "WorldInfo",
           "destroy_default_group", "pipe_ops_for", "world_from_env"]
