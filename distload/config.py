"""LoadConfig and the validated loader extra-config (vLLM's model_loader_extra_config contract)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from .errors import ConfigError
from .layout import Layout
from .quant.config import KV_CACHE_DTYPES, ONLINE

EXTRA_CONFIG_KEYS: Mapping[str, str] = MappingProxyType({
    "enable_weights_track": "true / false / unset (= on): merge every rank's record and report missing units",
    "huge_pages": "true / false (default true): on CPU ranks, ask for transparent huge pages under the "
                  "parameters (fewer page faults; the kernel's THP mode decides)",
    "num_read_threads": "positive integer: reader threads per rank "
                        "(default: the node's cores / its local ranks, at most 8 on CUDA)",
    "readahead": "true / false (default true): on CUDA ranks, ask the kernel for a cold file's next bytes "
                 "ahead of the readers",
    "staging_mib": "positive integer: host staging memory per rank in MiB, pinned on CUDA (default 256)",
    "verify_checksums": "true / false (default false): hash every file read against its reference digest",
})
"""the keys a loader extra-config may hold, with what each means"""

MIN_FAILURE_TIMEOUT = 1.0
"""the shortest failure timeout the watch can honour: heartbeats go every timeout / 5 s, and a
loaded host must be able to beat that often without being called dead"""

DEFAULT_STAGING_MIB = 256
"""host staging memory per rank, in MiB, when the extra-config names none"""
CUDA_READERS = 8
"""default reader threads per CUDA rank at most: on an H200 host (16 cores) the pinned pipeline
moved 42.6 GB/s with 8 readers, 38.5 with 12 and 33.3 with 16 (``benchmarks/pipeline_sweep.py``)"""

EXPERT_PLACEMENTS = ("linear", "round_robin")
"""how expert slots are assigned to expert-parallel groups"""

DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
})


def weights_track(extra_config: Mapping) -> bool:
    """The ``enable_weights_track`` contract, for ``load`` and ``distload.track`` alike: true, false,
    or unset (= on); anything else is an error. Other keys are not looked at here.

    Example:
        >>> weights_track({}), weights_track({"enable_weights_track": False, "num_threads": 8})
        (True, False)
    """
    value = extra_config.get("enable_weights_track")
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"enable_weights_track must be true, false or unset, got {value!r}")
    return True if value is None else value


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
    expert_parallel: bool = False
    """experts over every rank of a stage (vLLM's enable_expert_parallel): ep = tp x dp"""
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
    verify_checksums: bool = False
    """hash config.json, the index and every weight file whole, beside the reads, against the
    Hugging Face cache's blob names or the checkpoint's distload-manifest.json; a file that
    differs fails the load (also the extra-config key ``verify_checksums``)"""
    rules: "str | Mapping | None" = None
    """a rules file (path) or rules document (mapping) saying how each checkpoint tensor splits: load
    per-rank sharded state dicts of a model type without a built-in class (``--rules``; see
    ``distload.rules``); None: the reference model of config.json's model_type"""
    skip_units: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """test hook: rank -> checkpoint names that rank pretends not to load (``name[label]``: only
    that region of a fused tensor, e.g. ``...qkv_proj.weight[k]``)"""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.extra_config) - set(EXTRA_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"unknown loader extra-config key {unknown[0]!r}; allowed keys: "
                              f"{', '.join(EXTRA_CONFIG_KEYS)}")
        weights_track(self.extra_config)
        verify = self.extra_config.get("verify_checksums")
        for value in (verify, self.verify_checksums):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"verify_checksums must be true or false, got {value!r}")
        for key in ("readahead", "huge_pages"):
            if not isinstance(self.extra_config.get(key, True), bool):
                raise ConfigError(f"{key} must be true or false, got {self.extra_config[key]!r}")
        if verify is False and self.verify_checksums:
            raise ConfigError("verify_checksums=True and the loader extra-config's verify_checksums false disagree; "
                              "give it once")
        for key in ("num_read_threads", "staging_mib"):
            value = self.extra_config.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        timeout = self.failure_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= MIN_FAILURE_TIMEOUT \
                or timeout == float("inf"):
            raise ConfigError(f"failure_timeout must be a number of seconds of at least {MIN_FAILURE_TIMEOUT:g} "
                              f"(the watch cannot tell a shorter silence from a busy host), got {timeout!r}")
        if isinstance(self.redundant_experts, bool) or not isinstance(self.redundant_experts, int) \
                or self.redundant_experts < 0:
            raise ConfigError(f"redundant_experts must be 0 or a positive integer, got {self.redundant_experts!r}")
        if self.expert_parallel and self.ep != 1:
            raise ConfigError(f"ep={self.ep} and expert_parallel both set the expert-parallel size; give one")
        if self.expert_placement not in EXPERT_PLACEMENTS:
            raise ConfigError(f"expert_placement must be {' or '.join(EXPERT_PLACEMENTS)}, "
                              f"got {self.expert_placement!r}")
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
        if not (self.rules is None or isinstance(self.rules, Mapping) or isinstance(self.rules, str) and self.rules):
            raise ConfigError(f"rules must be a rules file path or a rules document (a mapping), got {self.rules!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported (supported: {', '.join(DTYPES)})")

    def layout(self, world_size: int) -> Layout:
        """The layout of this load on ``world_size`` ranks.

        Example:
            >>> LoadConfig(tp=2, expert_parallel=True).layout(8).ep
            8
        """
        if not self.expert_parallel:
            return Layout.for_world(world_size, tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep)
        plain = Layout.for_world(world_size, tp=self.tp, pp=self.pp, dp=self.dp)
        return Layout.for_world(world_size, tp=self.tp, pp=self.pp, dp=self.dp, ep=plain.tp * plain.dp)

    @property
    def track_enabled(self) -> bool:
        if self.track is not None:
            return self.track
        return weights_track(self.extra_config)

    @property
    def verify_enabled(self) -> bool:
        """Whether the load hashes its files against their reference digests."""
        return self.verify_checksums or self.extra_config.get("verify_checksums") is True

    def read_threads(self, local_ranks: int, *, cuda: bool = False) -> int:
        """Reader threads per rank: the extra-config's, else this node's cores shared by its ranks
        (on CUDA at most CUDA_READERS: more readers than that slowed the pinned pipeline)."""
        if "num_read_threads" in self.extra_config:
            return int(self.extra_config["num_read_threads"])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = max(1, cores // max(1, local_ranks))
        return min(share, CUDA_READERS) if cuda else share

    @property
    def readahead(self) -> bool:
        """Whether cold files are asked for ahead of the readers (``readahead``)."""
        return self.extra_config.get("readahead", True)

    @property
    def huge_pages(self) -> bool:
        """Whether CPU parameters ask for transparent huge pages (``huge_pages``)."""
        return self.extra_config.get("huge_pages", True)

    @property
    def staging_bytes(self) -> int:
        """Host staging memory per rank (pinned on CUDA)."""
        return int(self.extra_config.get("staging_mib", DEFAULT_STAGING_MIB)) * 1024 * 1024

    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype is not None else None
