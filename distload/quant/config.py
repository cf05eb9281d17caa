"""Which layers are quantized, and how: ``quantization_config`` of config.json, or ``--quantize``.

Supported: ``quant_method: fp8`` (DeepSeek-V3 style: ``weight_block_size`` blocks with
``weight_scale_inv``; without blocks one ``weight_scale`` per tensor), ``quant_method:
compressed-tensors`` in the ``float-quantized`` format (FP8 weights per tensor, per
channel or per block; dynamic activations, or static per-tensor ``input_scale``) and the
``pack-quantized`` format (int4 / int8 weights, per group or channel, symmetric or not;
``quant.packed``), ``quant_method: gptq`` (4 / 8 bits, ``desc_act``, both zero-point
conventions; ``quant.gptq``), ``quant_method: mxfp4`` (gpt-oss's packed experts; ``quant.mxfp4``),
online FP8 of an unquantized checkpoint, and FP8 KV-cache scales.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import ConfigError
from .base import QuantMethod
from . import gptq, packed
from .fp8 import OnlineFP8, SerializedFP8
from .gptq import GPTQ
from .mxfp4 import MXFP4
from .packed import PackedInt

FORMATS: tuple[type[QuantMethod], ...] = (SerializedFP8, OnlineFP8, PackedInt, GPTQ, MXFP4)
"""every scheme class (asked about tensors no scheme declared: ``QuantMethod.unquantized_refusal``)"""
QUANT_METHODS = ("fp8", "compressed-tensors", "gptq", "mxfp4")
"""``quant_method`` values of config.json that load"""
CT_FORMATS = ("float-quantized", "pack-quantized")
"""compressed-tensors storage formats that load"""
CT_STRATEGIES = ("tensor", "channel", "block")
"""compressed-tensors FP8 weight strategies that load"""
ONLINE = ("fp8",)
"""``--quantize`` values"""
KV_CACHE_DTYPES = ("auto", "fp8")
"""``--kv-cache-dtype`` values (auto: FP8 only when the checkpoint's config says so)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One scheme and the module names it applies to."""

    method: QuantMethod
    targets: tuple[str, ...]
    """a kind of layer (``Linear``: every quantizable linear; ``PackedExperts``: experts packed per
    layer, see ``Quantizable.TARGET``), exact module names, or ``re:`` regexes"""


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantConfig:
    """The model's quantization: per-module schemes and the KV-cache dtype."""

    rules: tuple[Rule, ...] = ()
    """schemes, first match wins"""
    ignore: tuple[str, ...] = ()
    """modules left unquantized: exact names, ``re:`` regexes, or (fp8's ``modules_to_not_convert``)
    name fragments"""
    ignore_fragments: bool = False
    """``ignore`` entries match any module whose name contains them (transformers' FP8 rule)"""
    ignore_patterns: bool = False
    """``ignore`` entries are regexes matching a module name from its start to a dot or its end,
    or the name's suffix (transformers' ``modules_to_not_convert`` rule for mxfp4)"""
    kv_cache_fp8: bool = False
    """attention declares ``k_scale`` / ``v_scale``"""
    description: str = ""
    """for the report"""

    def method_for(self, module: str, parts: Sequence[str], target: str = "Linear") -> QuantMethod | None:
        """The scheme of the layer at ``module`` whose weight is made of checkpoint modules ``parts``
        (q_proj, k_proj, v_proj of a fused QKV), a layer of the kind ``target``; None: unquantized.

        Raises:
            ConfigError: the parts of one fused layer are not all quantized the same way.
        """
        chosen = {p: self._match(p, target) for p in parts}
        if len(set(chosen.values())) > 1:  # schemes compare by value (two groups may repeat one)
            listed = ", ".join(f"{p}: {m.name if m else 'unquantized'}" for p, m in chosen.items())
            raise ConfigError(f"the parts of the fused layer {module} are quantized differently ({listed}); "
                              "they must share one scheme")
        return chosen[parts[0]]

    def feature_block(self, module: str, target: str) -> int | None:
        """The block of features on which the scheme of the layer at ``module`` (a ``target``) lets a
        TP shard end unevenly (``QuantMethod.feature_block``); None: the layer splits evenly."""
        method = self._match(module, target)
        return None if method is None else method.feature_block

    def _match(self, name: str, target: str) -> QuantMethod | None:
        if any(_matches(name, p, fragment=self.ignore_fragments, prefix=self.ignore_patterns) for p in self.ignore):
            return None
        for rule in self.rules:
            if any(t == target or _matches(name, t, fragment=False) for t in rule.targets):
                return rule.method
        return None


def _matches(name: str, pattern: str, *, fragment: bool, prefix: bool = False) -> bool:
    """``re:`` patterns match from the start of the name; others the whole name, or with
    ``fragment`` a run of whole dotted components (``mlp.gate`` is not ``mlp.gate_proj``,
    ``model.layers.1`` is not ``model.layers.12``), or with ``prefix`` as a regex from the
    start up to a dot or the end (``model.layers.*.self_attn``), or as the name's suffix."""
    if prefix:
        return re.match(f"(?:{pattern})(?:(?<=\\.)|(?=\\.|$))", name) is not None or name.endswith(pattern)
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if fragment:
        return f".{pattern}." in f".{name}."
    return name == pattern


def quant_config(model_config: Mapping, *, quantize: str | None = None, kv_cache_dtype: str = "auto") -> QuantConfig:
    """Reads config.json's ``quantization_config`` (and the CLI's online / KV-cache options).

    Raises:
        ConfigError: an unknown ``quant_method``, format or scheme (the message lists the
            supported ones), or ``--quantize`` on an already quantized checkpoint.

    Example:
        >>> q = quant_config({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
        ...                                           "modules_to_not_convert": ["lm_head"]}})
        >>> q.method_for("model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"]).name
        'fp8 block 128x128'
        >>> q.method_for("lm_head", ["lm_head"]) is None
        True
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv cache dtype {kv_cache_dtype!r} is not supported (supported: {', '.join(KV_CACHE_DTYPES)})")
    kv = kv_cache_dtype == "fp8"
    q = model_config.get("quantization_config")
    if q is not None and not isinstance(q, Mapping):
        raise ConfigError("config.json quantization_config must be an object")
    if quantize is not None:
        if quantize not in ONLINE:
            raise ConfigError(f"--quantize {quantize!r} is not supported (supported: {', '.join(ONLINE)})")
        if q is not None:
            raise ConfigError(f"--quantize {quantize} applies to unquantized checkpoints; this one is already "
                              f"quantized ({q.get('quant_method')!r})")
        return QuantConfig(rules=(Rule(method=OnlineFP8(), targets=("Linear",)),), kv_cache_fp8=kv,
                           description="online fp8: weights quantized per channel while loading")
    if q is None:
        return QuantConfig(kv_cache_fp8=kv)
    method = q.get("quant_method")
    if method == "fp8":
        return _fp8(q, kv)
    if method == "compressed-tensors":
        return _compressed_tensors(q, kv)
    if method == "gptq":
        scheme, targets = gptq.parse(q)
        return QuantConfig(rules=(Rule(method=scheme, targets=targets),), ignore=("lm_head",), kv_cache_fp8=kv,
                           description=scheme.name)
    if method == "mxfp4":
        return _mxfp4(q, kv)
    raise ConfigError(f"config.json quantization_config quant_method {method!r} is not supported "
                      f"(supported: {', '.join(QUANT_METHODS)}; or load an unquantized checkpoint with --quantize fp8)")


def _fp8(q: Mapping, kv: bool) -> QuantConfig:
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quant_method fp8 with fmt {fmt!r} is not supported (supported: e4m3)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ConfigError(f"quant_method fp8 activation_scheme {scheme!r} is not supported (supported: dynamic, static)")
    block = q.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, Sequence) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"quant_method fp8 weight_block_size must be two positive integers, got {block!r}")
        if scheme == "static":
            raise ConfigError("quant_method fp8 with weight_block_size supports activation_scheme dynamic only")
        method = SerializedFP8(strategy="block", block=tuple(block), scale_suffix="weight_scale_inv",
                               name=f"fp8 block {block[0]}x{block[1]}")
    else:
        method = SerializedFP8(strategy="tensor", static_input=scheme == "static", name=f"fp8 per-tensor ({scheme})")
    ignore = _names(q.get("modules_to_not_convert") or q.get("ignored_layers") or (), "modules_to_not_convert")
    return QuantConfig(rules=(Rule(method=method, targets=("Linear",)),), ignore=ignore, ignore_fragments=True,
                       kv_cache_fp8=kv, description=f"{method.name}, activations {scheme}")


def _compressed_tensors(q: Mapping, kv: bool) -> QuantConfig:
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError("compressed-tensors quantization_config has no config_groups")
    rules = []
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            raise ConfigError(f"compressed-tensors config group {name} must be an object")
        group_fmt = group.get("format") or fmt
        if group_fmt not in CT_FORMATS:
            raise ConfigError(f"compressed-tensors format {group_fmt!r} (group {name}) is not supported "
                              f"(supported: {', '.join(CT_FORMATS)})")
        scheme = _ct_scheme(name, group) if group_fmt == "float-quantized" else packed.parse_group(name, group)
        rules.append(Rule(method=scheme, targets=tuple(group.get("targets") or ())))
    scheme = q.get("kv_cache_scheme")
    if scheme is not None:
        _fp8_args(scheme, "kv_cache_scheme")
        kv = True
    ignore = _names(q.get("ignore") or (), "ignore")
    names = ", ".join(r.method.name for r in rules)
    return QuantConfig(rules=tuple(rules), ignore=ignore, kv_cache_fp8=kv, description=f"compressed-tensors {names}")


def _ct_scheme(group: str, spec: Mapping) -> SerializedFP8:
    weights = spec.get("weights")
    if not weights:
        raise ConfigError(f"compressed-tensors group {group} quantizes no weights (activation-only schemes are "
                          "not supported)")
    _fp8_args(weights, f"group {group} weights")
    strategy = weights.get("strategy", "tensor")
    if strategy not in CT_STRATEGIES:
        raise ConfigError(f"compressed-tensors weight strategy {strategy!r} (group {group}) is not supported "
                          f"(supported: {', '.join(CT_STRATEGIES)})")
    block = tuple(weights.get("block_structure") or (128, 128))
    if strategy == "block" and not (len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"compressed-tensors block_structure must be two positive integers, got {list(block)!r}")
    act = spec.get("input_activations")
    static = False
    if act:
        _fp8_args(act, f"group {group} input_activations")
        static = not act.get("dynamic", False)
        if static and act.get("strategy", "tensor") != "tensor":
            raise ConfigError(f"compressed-tensors static input strategy {act.get('strategy')!r} (group {group}) "
                              "is not supported (supported: tensor)")
    if spec.get("output_activations"):
        raise ConfigError(f"compressed-tensors output_activations (group {group}) are not supported")
    label = f"fp8 {strategy}" + (f" {block[0]}x{block[1]}" if strategy == "block" else "") + \
        (", static input" if static else ", dynamic input" if act else ", weight-only")
    return SerializedFP8(strategy=strategy, block=block, static_input=static, scale_suffix="weight_scale", name=label)


def _mxfp4(q: Mapping, kv: bool) -> QuantConfig:
    """transformers' rule: every packed experts layer (gpt-oss's) but those ``modules_to_not_convert``
    names; attention, routers, embeddings and the head are never MXFP4.

    Raises:
        ConfigError: ``modules_to_not_convert`` is not a list of names, or one is not a regex.
    """
    ignore = _names(q.get("modules_to_not_convert") or (), "modules_to_not_convert")
    for pattern in ignore:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"quant_method mxfp4 modules_to_not_convert entry {pattern!r} is not a regex ({err})")
    method = MXFP4()
    return QuantConfig(rules=(Rule(method=method, targets=("PackedExperts",)),), ignore=ignore, ignore_patterns=True,
                       kv_cache_fp8=kv, description=method.name)


def _names(value, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"quantization_config {key} must be a list of module names, got {value!r}")
    return tuple(value)


def _fp8_args(args: Mapping, what: str) -> None:
    """Only symmetric 8-bit float quantization is FP8."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"compressed-tensors {what} must be an object, got {args!r}")
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ConfigError(f"compressed-tensors {what}: {args.get('num_bits')}-bit {args.get('type')} is not "
                          "supported (supported: 8-bit float, i.e. FP8)")
    if args.get("symmetric") is False:
        raise ConfigError(f"compressed-tensors {what}: asymmetric FP8 is not supported (supported: symmetric)")
