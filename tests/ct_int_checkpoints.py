"""Tiny int4 / int8 checkpoints in the compressed-tensors ``pack-quantized`` format, written by the
compressed-tensors library, and their dequantized float32 twins made by the library's own
decompression (the reference for values and logits).

As in ``tests.ct_checkpoints``: the float model is ``write_hf_checkpoint``'s, loaded back with
transformers; its fused MoE experts are unfused into one ``nn.Linear`` per expert matrix first
(compressed-tensors quantizes ``nn.Linear`` only); the library applies the scheme, the scales
(and zero points) come from each group's minimum and maximum through the library's
``calculate_qparams`` (it has no observers of its own), and ``ModelCompressor.compress_model``,
``save_pretrained`` and ``update_config`` write the checkpoint.

Builders run in the test process: they import transformers and compressed_tensors.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from tests.ct_checkpoints import _ignore_list, _unfuse_experts
from tests.hf_checkpoints import INDEX, HFSpec, read_tensors, save_float_twin, write_hf_checkpoint

PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
"""what ``pack-quantized`` stores per quantized linear"""


def write_ct_int_checkpoint(directory: str, spec: HFSpec, *, bits: int, group_size: int | None = None,
                            symmetric: bool = True, max_shard_size: str = "48KB") -> str:
    """Writes ``spec``'s random model as an int ``pack-quantized`` compressed-tensors checkpoint.

    Every ``nn.Linear`` but ``lm_head`` and the MoE routers gets ``bits``-bit int weights, one scale
    per ``group_size`` inputs (None: per output row, the ``channel`` strategy), with zero points
    unless ``symmetric``; activations stay float (weight-only). Other tensors stay float32.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        write_hf_checkpoint(tmp, spec, max_shard_size=max_shard_size)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    _unfuse_experts(model, spec.model_type)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                               strategy="group" if group_size else "channel", group_size=group_size)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")},
        ignore=_ignore_list(model, spec.model_type), format="pack-quantized")
    apply_quantization_config(model, config, show_progress=False)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None:
            _set_weight_qparams(m, weights)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    compressor.update_config(directory)
    assert os.path.exists(os.path.join(directory, INDEX))
    return directory


def _set_weight_qparams(module, args) -> None:
    """``weight_scale`` (and ``weight_zero_point``) from each group's extremes, by the library's formula."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.utils import calculate_qparams

    w = module.weight.detach()
    groups = w.reshape(w.shape[0], -1, args.group_size) if args.group_size else w.reshape(w.shape[0], 1, -1)
    scale, zero = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)
    update_offload_parameter(module, "weight_scale", scale.reshape(module.weight_scale.shape).to(torch.float32))
    if not args.symmetric:
        zp = module.weight_zero_point
        update_offload_parameter(module, "weight_zero_point", zero.reshape(zp.shape).to(zp.dtype))


def dequantized_int_checkpoint(src: str, dst: str) -> str:
    """Writes ``src`` as a plain float32 checkpoint whose quantized weights are the library's own
    decompression (``PackedQuantizationCompressor.decompress`` of each linear's tensors, with the
    scheme read back from config.json); config.json loses its ``quantization_config``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qconfig = config.pop("quantization_config")
    (group,) = qconfig["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    tensors = read_tensors(src)
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[2] not in PACKED}
    for name in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":
            state = {k: tensors[f"{prefix}.{k}"] for k in PACKED if f"{prefix}.{k}" in tensors}
            out[f"{prefix}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    return save_float_twin(src, dst, out, config)
