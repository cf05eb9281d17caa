"""Reference models built from config.json, split over the layout's TP group."""

from .registry import build_model, supported_model_types

__all__ = ["build_model", "supported_model_types"]
