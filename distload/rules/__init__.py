"""Rules mode: load a model type distload has no class for, from a rules file that says how each
checkpoint tensor splits, into per-rank sharded state dicts with the same tracking, report and dry
run as a built-in model (``--rules rules.json``, ``LoadConfig(rules=...)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..layout import Layout
from .bind import Bound, bind
from .document import Rules, parse_rules, read_rules
from .model import RulesModel

if TYPE_CHECKING:
    from ..checkpoint.directory import Checkpoint
    from ..config import LoadConfig
    from ..models import ModelBuilder

__all__ = ["Bound", "Rules", "RulesModel", "bind", "bind_rules", "parse_rules", "read_rules", "rules_builder",
           "rules_note"]


def bind_rules(config: "LoadConfig", ckpt: "Checkpoint", layout: Layout, config_file: str | None = None) -> Bound:
    """Reads ``config.rules`` and binds it to the checkpoint's headers and the layout.

    Raises:
        ConfigError: a rules file that cannot be right (naming the rule), or options rules mode does
            not take (``--quantize``, an FP8 KV cache).
        PlanError, LayoutError: as ``bind``.
    """
    rules = read_rules(config.rules)
    if config.quantize is not None or config.kv_cache_dtype != "auto":
        given = f"quantize={config.quantize}" if config.quantize is not None else \
            f"kv_cache_dtype={config.kv_cache_dtype}"
        raise ConfigError(f"{given} applies to built-in models; rules mode loads each tensor as it is stored",
                          file=rules.source)
    return bind(rules, ckpt.config, ckpt.tensors, layout, config_file=config_file)


def rules_builder(bound: Bound, config: "LoadConfig") -> "ModelBuilder":
    """The builder of a rank's ``RulesModel`` (tensors keep their stored dtype unless ``--dtype`` asks)."""
    asked = config.torch_dtype()
    return lambda ctx: RulesModel(bound, layout=ctx.layout, rank=ctx.rank, experts=ctx.experts, dtype=asked,
                                  absent_dtype=ctx.dtype, device=ctx.device)


def rules_note(config: "LoadConfig") -> str:
    """The report's note on a rules-mode load."""
    rules = read_rules(config.rules)
    source = rules.source or "LoadConfig.rules"
    return (f"rules mode: {len(rules.rules)} rules from {source}; per-rank sharded state dicts "
            "(no model class, no forward)")
