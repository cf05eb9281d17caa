"""Reference models built from config.json, split over the layout's TP group."""

from .registry import (Architecture, BuildContext, ModelBuilder, architecture, build_model, check_config,
                       default_ignores, expert_facts, model_notes, reference_model, register,
                       supported_model_types)

__all__ = ["Architecture", "BuildContext", "ModelBuilder", "architecture", "build_model", "check_config",
           "default_ignores", "expert_facts", "model_notes", "reference_model", "register", "supported_model_types"]
