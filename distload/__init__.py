"""distload: load safetensors checkpoints into tensor/data-parallel models, and prove every
parameter on every rank was filled."""

from . import comm
from .comm import WorldInfo
from ._version import __version__
from .api import Loaded, load
from .config import EXTRA_CONFIG_KEYS, LoadConfig
from .errors import (CheckpointError, ConfigError, DistloadError, LayoutError, MissingWeightsError,
                     PeerFailedError, PlanError)
from .examples import example_checkpoint
from . import track
from .layout import Layout
from .models import BuildContext
from .report import LoadReport


__all__ = ["BuildContext", "CheckpointError", "ConfigError", "DistloadError", "EXTRA_CONFIG_KEYS", "LayoutError", "LoadConfig",
           "LoadReport", "Loaded", "MissingWeightsError", "PeerFailedError", "PlanError", "WorldInfo", "example_checkpoint", "load",
           "Layout", "__version__", "track"]
