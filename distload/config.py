"""LoadConfig and the validated loader extra-config (vLLM's model_loader_extra_config contract)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from .errors import ConfigError
from .quant.config import KV_CACHE_DTYPES, ONLINE

EXTRA_CONFIG_KEYS: Mapping[str, str] = MappingProxyType({
    "enable_weights_track": "true / false / unset (= on): merge every rank's record and report missing units",
    "num_read_threads": "positive integer: concurrent reads per rank (default 4)",
})
"""the keys a loader extra-config may hold, with what each means"""

DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
})


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadConfig:
    """How to load: layout, device, dtype and tracking options (all keyword-only).

    Example:
        >>> LoadConfig(tp=2, extra_config={"enable_weights_track": True}).track_enabled
        True
    """

    tp: int = 1
    """tensor-parallel degree"""
    pp: int = 1
    """pipeline stages (decoder layers split evenly, the first stages taking one more)"""
    dp: int | None = None
    """data-parallel replicas; None: world size / (tp x pp)"""
    ep: int = 1
    """expert-parallel groups per stage (see Layout.ep)"""
    expert_placement: str = "linear"
    """``linear`` (contiguous slots per group) or ``round_robin``"""
    redundant_experts: int = 0
    """extra expert slots holding replicas of the first experts"""
    expert_map: str | None = None
    """JSON file mapping, per layer, each logical expert to its physical slots"""
    device: str | None = None
    """``cpu`` or ``cuda``; None: cuda when available"""
    dtype: str | None = None
    """model dtype name; None: the checkpoint's"""
    extra_config: Mapping = field(default_factory=dict)
    """loader extra-config; keys in EXTRA_CONFIG_KEYS"""
    track: bool | None = None
    """overrides ``enable_weights_track`` when set (the CLI's --track)"""
    ignore: tuple[str, ...] = ()
    """regexes of checkpoint names that are never unexpected"""
    strict: bool = False
    """unexpected tensors fail the load too"""
    check_finite: bool = False
    """scan every loaded piece for NaN/Inf (on its device); reported as ``nonfinite``;
    with ``strict`` it fails the load"""
    strict_dtype: bool = False
    """refuse checkpoint tensors whose dtype differs from the model's instead of casting"""
    allow_pickle_format: bool = False
    """read ``.bin``/``.pt`` weight files (with ``torch.load(weights_only=True)``) when there
    are no safetensors files; refused otherwise, since pickles can run code"""
    failure_timeout: float = 30.0
    """seconds without a heartbeat after which a rank counts as dead (killed, host gone);
    a rank that raises is reported to every rank at once, not after this"""
    quantize: str | None = None
    """``fp8``: quantize an unquantized checkpoint's linear weights to FP8 while loading"""
    kv_cache_dtype: str = "auto"
    """``fp8``: attention declares KV-cache scales; ``auto``: only when config.json's
    quantization_config has a KV-cache scheme"""
    skip_units: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """test hook: rank -> checkpoint names that rank pretends not to load"""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.extra_config) - set(EXTRA_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"unknown loader extra-config key {unknown[0]!r}; allowed keys: "
                              f"{', '.join(EXTRA_CONFIG_KEYS)}")
        track = self.extra_config.get("enable_weights_track")
        if track is not None and not isinstance(track, bool):
            raise ConfigError(f"enable_weights_track must be true, false or unset, got {track!r}")
        threads = self.extra_config.get("num_read_threads", 4)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"num_read_threads must be a positive integer, got {threads!r}")
        if not self.failure_timeout > 0:
            raise ConfigError(f"failure_timeout must be a positive number of seconds, got {self.failure_timeout!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"--ignore {pattern!r} is not a valid regular expression: {err}") from None
        if self.quantize is not None and self.quantize not in ONLINE:
            raise ConfigError(f"quantize {self.quantize!r} is not supported (supported: {', '.join(ONLINE)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported "
                              f"(supported: {', '.join(KV_CACHE_DTYPES)})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported (supported: {', '.join(DTYPES)})")

    @property
    def track_enabled(self) -> bool:
        if self.track is not None:
            return self.track
        value = self.extra_config.get("enable_weights_track")
        return True if value is None else value

    @property
    def num_read_threads(self) -> int:
        return int(self.extra_config.get("num_read_threads", 4))

    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype is not None else None
