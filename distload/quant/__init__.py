"""Quantized checkpoints: FP8 (block, channel, tensor), compressed-tensors (FP8, int4 / int8 packed), GPTQ,
online FP8, KV-cache scales. Each format is one module behind ``base.QuantMethod``."""

from .config import KV_CACHE_DTYPES, ONLINE, QUANT_METHODS, QuantConfig, quant_config
from .fp8 import OnlineFP8, SerializedFP8

__all__ = ["KV_CACHE_DTYPES", "ONLINE", "QUANT_METHODS", "OnlineFP8", "QuantConfig", "SerializedFP8", "quant_config"]
