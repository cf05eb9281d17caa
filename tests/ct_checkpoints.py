"""Tiny FP8 checkpoints in the compressed-tensors format, written by the compressed-tensors library.

A checkpoint made by hand would only show that distload agrees with our own reading of the
format; this one is quantized, compressed and described (``quantization_config``) by the
library vLLM and LLM Compressor use, so names, shapes, dtypes and config fields are the real ones.

The float model is the one ``write_hf_checkpoint`` writes (same seed, same re-drawn
parameters), loaded back with transformers. compressed-tensors 0.20 has no observers or
calibration loop of its own (they live in llmcompressor, not installed), so the minima and
maxima are measured here and turned into scales by the library's ``calculate_qparams``:
weights directly, input activations and k/v states from forward passes over random tokens.

Two things the library cannot do with transformers 5 and are done here instead:

* transformers 5 keeps MoE experts as fused 3-D parameters (``experts.gate_up_proj``), which
  compressed-tensors cannot target (it quantizes ``nn.Linear`` only); each fused experts module
  is replaced by one ``nn.Linear`` per expert and matrix, named as the checkpoint names them,
  so that the saved tensors are the per-expert ones real FP8 MoE checkpoints carry.
* compressed-tensors recognizes an attention module with a kv cache by a ``past_key_value(s)``
  forward argument, which transformers 5.24 renamed ``cache``: ``apply_quantization_config``
  silently attaches no kv-cache quantization. ``k_scale`` / ``v_scale`` are registered with the
  library's ``initialize_qparams`` and calibrated here on the key / value states the attention
  hands to its cache (after rotary embedding and q/k norms).

Builders run in the test process: they import transformers and compressed_tensors.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile

import torch

from tests.hf_checkpoints import INDEX, HFSpec, read_tensors, save_float_twin, write_hf_checkpoint

STRATEGIES = ("tensor", "channel", "block")

EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
"""model_type -> checkpoint names of an expert's (gate, up, down) matrices; default gate/up/down_proj"""

CALIBRATION = (4, 2, 16)
"""forward passes, batch size, tokens: enough for every expert of the tiny MoE models to see tokens"""


def write_ct_checkpoint(directory: str, spec: HFSpec, *, strategy: str, block: tuple[int, int] = (16, 16),
                        static_input: bool = False, kv_cache: bool = False, max_shard_size: str = "48KB") -> str:
    """Writes ``spec``'s random model as an FP8 compressed-tensors checkpoint (``float-quantized``).

    Every ``nn.Linear`` but ``lm_head``, MoE routers and qwen2_moe's ``shared_expert_gate`` gets
    FP8 e4m3 symmetric weights with ``strategy`` scales (``block``: ``block`` = [rows, columns]);
    input activations are dynamic per token, or with ``static_input`` static per tensor with a
    calibrated ``input_scale``; ``kv_cache`` adds a static per-tensor FP8 ``kv_cache_scheme``
    with calibrated ``self_attn.k_scale`` / ``v_scale``. Other tensors stay float32.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM

    assert strategy in STRATEGIES, strategy
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_checkpoint(tmp, spec, max_shard_size=max_shard_size)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    _unfuse_experts(model, spec.model_type)

    fp8 = dict(num_bits=8, type="float", symmetric=True)
    weights = QuantizationArgs(**fp8, strategy=strategy, dynamic=False,
                               block_structure=list(block) if strategy == "block" else None)
    inputs = (QuantizationArgs(**fp8, strategy="tensor", dynamic=False) if static_input
              else QuantizationArgs(**fp8, strategy="token", dynamic=True))
    kv_args = QuantizationArgs(**fp8, strategy="tensor", dynamic=False) if kv_cache else None
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs,
                                                      format="float-quantized")},
        ignore=_ignore_list(model, spec.model_type), kv_cache_scheme=kv_args, format="float-quantized")
    apply_quantization_config(model, config, show_progress=False)

    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None}
    for m in linears.values():
        _set_qparam(m, "weight", *_weight_min_max(m.weight.detach(), weights), weights)
    if static_input or kv_cache:
        _calibrate(model, spec, linears if static_input else {}, kv_args)

    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    compressor.update_config(directory)
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.exists(os.path.join(directory, INDEX)), files
    return directory


def dequantized_checkpoint(src: str, dst: str) -> str:
    """Writes ``src`` dequantized as a plain float32 checkpoint (reference for logits).

    Written here from the format's definition, not with distload or compressed-tensors:
    ``weight.float() * scale``, the scale a scalar (tensor), one per row (channel) or one per
    [rows, columns] block, the last blocks of a dimension possibly partial. Scales are dropped,
    the shard files keep their tensors, and config.json loses its ``quantization_config``.
    """
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qconfig = config.pop("quantization_config")
    assert qconfig["quant_method"] == "compressed-tensors", qconfig
    (group,) = qconfig["config_groups"].values()
    args = group["weights"]
    assert (args["type"], args["num_bits"], args["symmetric"]) == ("float", 8, True), args

    tensors = read_tensors(src)
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".input_scale", ".k_scale", ".v_scale")):
            continue
        scale = tensors.get(name + "_scale") if name.endswith(".weight") else None
        out[name] = t if scale is None else _dequantize(t, scale, args["strategy"], args.get("block_structure"))

    return save_float_twin(src, dst, out, config)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, strategy: str, block) -> torch.Tensor:
    w, s = weight.float(), scale.float()
    if strategy == "tensor":
        assert s.numel() == 1, s.shape
        return w * s.reshape(())
    if strategy == "channel":
        assert s.shape == (w.shape[0], 1), (s.shape, w.shape)
        return w * s
    assert strategy == "block", strategy
    bn, bk = block
    rows, cols = w.shape
    assert s.shape == (math.ceil(rows / bn), math.ceil(cols / bk)), (s.shape, w.shape, block)
    return w * s.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]


def _ignore_list(model, model_type: str) -> list[str]:
    """lm_head, the MoE routers (as the model and, for mixtral, the checkpoint name them) and
    qwen2_moe's one-output ``shared_expert_gate``: the layers FP8 recipes leave in high precision."""
    names = [n for n, _ in model.named_modules()]
    ignore = ["lm_head"]
    if any(n.endswith("mlp.gate") for n in names):
        ignore.append("re:.*mlp.gate$")
    if model_type == "mixtral":
        ignore.append("re:.*block_sparse_moe.gate$")
    if any(n.endswith("shared_expert_gate") for n in names):
        ignore.append("re:.*shared_expert_gate$")
    return ignore


def _weight_min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Minima and maxima over the groups that share a scale: the whole matrix, a row, or a
    block (zero padding of partial blocks changes nothing: ``calculate_qparams`` keeps 0 in range)."""
    if args.strategy == "tensor":
        return w.amin(), w.amax()
    if args.strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    bn, bk = args.block_structure
    rows, cols = math.ceil(w.shape[0] / bn), math.ceil(w.shape[1] / bk)
    padded = torch.nn.functional.pad(w, (0, cols * bk - w.shape[1], 0, rows * bn - w.shape[0]))
    blocks = padded.reshape(rows, bn, cols, bk)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def _set_qparam(module, base: str, lo: torch.Tensor, hi: torch.Tensor, args) -> None:
    """Sets ``{base}_scale`` (registered by the library) from observed extremes, with the library's formula."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, _ = calculate_qparams(lo, hi, args)
    param = getattr(module, f"{base}_scale")
    update_offload_parameter(module, f"{base}_scale", scale.reshape(param.shape).to(param.dtype))


def _calibrate(model, spec: HFSpec, linears: dict, kv_args) -> None:
    """Runs random tokens through the unquantized model, recording the extremes of every
    static-input linear's input and (``kv_args``) of the key / value states each attention caches."""
    from compressed_tensors.quantization import disable_quantization, enable_quantization
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

    seen: dict[tuple[object, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(module, base: str, x: torch.Tensor) -> None:
        lo, hi = x.detach().amin(), x.detach().amax()
        if (module, base) in seen:
            lo, hi = torch.minimum(lo, seen[module, base][0]), torch.maximum(hi, seen[module, base][1])
        seen[module, base] = (lo, hi)

    handles = [m.register_forward_pre_hook(lambda m, args: observe(m, "input", args[0])) for m in linears.values()]
    attentions = [m for n, m in model.named_modules() if n.endswith("self_attn")] if kv_args is not None else []
    for attn in attentions:
        handles.append(attn.register_forward_pre_hook(_kv_recorder(observe), with_kwargs=True))

    model.apply(disable_quantization)  # the scales are still empty
    generator = torch.Generator().manual_seed(spec.seed + 1)
    passes, batch, tokens = CALIBRATION
    try:
        with torch.no_grad():
            for _ in range(passes):
                model(torch.randint(0, spec.vocab_size, (batch, tokens), generator=generator), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.apply(enable_quantization)

    for name, m in linears.items():
        assert (m, "input") in seen, f"calibration sent no tokens through {name}"
        _set_qparam(m, "input", *seen[m, "input"], m.quantization_scheme.input_activations)
    text = model.config.get_text_config()
    for attn in attentions:
        for base in ("k", "v"):
            initialize_qparams(attn, base, kv_args, observed_shape=(text.num_key_value_heads, None, text.head_dim),
                               observed_dtype=next(attn.parameters()).dtype, force_zero_point=False)
            _set_qparam(attn, base, *seen[attn, base], kv_args)


def _kv_recorder(observe):
    """A pre-hook handing the attention a cache that records the key / value states it is given."""

    class Recorder:
        def __init__(self, attn, inner):
            self.attn, self.inner = attn, inner

        def update(self, key_states, value_states, *args, **kwargs):
            observe(self.attn, "k", key_states)
            observe(self.attn, "v", value_states)
            if self.inner is None:
                return key_states, value_states
            return self.inner.update(key_states, value_states, *args, **kwargs)

    def hook(attn, args, kwargs):
        params = inspect.signature(attn.forward).parameters
        (name,) = [n for n in ("cache", "past_key_values", "past_key_value") if n in params]
        kwargs[name] = Recorder(attn, kwargs.get(name))
        return args, kwargs

    return hook


class _LinearExperts(torch.nn.ModuleList):
    """Stands in for transformers 5's fused experts module (same forward signature and arithmetic)
    with one ``nn.Linear`` per expert matrix, which compressed-tensors can quantize."""

    def __init__(self, fused: torch.nn.Module, names: tuple[str, str, str]):
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        inter, hidden = gate_up.shape[1] // 2, gate_up.shape[2]
        experts = []
        for e in range(gate_up.shape[0]):
            expert = torch.nn.Module()
            for name, w in zip(names, (gate_up[e, :inter], gate_up[e, inter:], down[e])):
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
                linear.weight.data.copy_(w)
                setattr(expert, name, linear)
            experts.append(expert)
        super().__init__(experts)
        self.names, self.act_fn = names, fused.act_fn
        assert hidden == down.shape[1]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        gate, up, down = self.names
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = getattr(expert, down)(self.act_fn(getattr(expert, gate)(x)) * getattr(expert, up)(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _unfuse_experts(model, model_type: str) -> None:
    """Replaces every fused experts module (3-D ``gate_up_proj`` / ``down_proj``) by ``_LinearExperts``."""
    names = EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    fused = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter) and m.gate_up_proj.dim() == 3]
    for name, module in fused:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _LinearExperts(module, names))
