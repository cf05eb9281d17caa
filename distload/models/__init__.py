"""Reference models built from config.json, split over the layout's TP group."""

from .registry import (BuildContext, ModelBuilder, build_model, check_config, default_ignores, expert_facts,
                       reference_model, supported_model_types)

__all__ = ["BuildContext", "ModelBuilder", "build_model", "check_config", "default_ignores", "expert_facts",
           "reference_model", "supported_model_types"]
