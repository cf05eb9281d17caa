"""Quantized checkpoints: FP8 (block, channel, tensor), compressed-tensors, online FP8, KV-cache scales."""

from .config import KV_CACHE_DTYPES, ONLINE, QUANT_METHODS, QuantConfig, quant_config
from .fp8 import OnlineFP8, SerializedFP8

__all__ = ["KV_CACHE_DTYPES", "ONLINE", "QUANT_METHODS", "OnlineFP8", "QuantConfig", "SerializedFP8", "quant_config"]
