"""Block-wise FP8 checkpoints in the DeepSeek-V3 format, made from the float32 checkpoints of
``tests.hf_checkpoints``, and their dequantized float32 twins (the reference for logits).

The format (DeepSeek-V3's README_WEIGHTS.md "FP8 Weights"; read by transformers'
``FineGrainedFP8Config`` / ``FP8Linear`` and vLLM's ``Fp8Config`` with ``weight_block_size``):

* ``config.json`` has ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [bn, bk], "modules_to_not_convert": [...]}``.
  ``modules_to_not_convert`` is transformers' key for the skip list (vLLM reads its own
  ``ignored_layers`` and falls back to ``modules_to_not_convert``); it is written because once
  the key is present transformers no longer adds its default skips, so ``lm_head`` must be in it.
* a quantized linear ``X`` stores ``X.weight`` as float8_e4m3fn ``[out, in]`` and
  ``X.weight_scale_inv`` as float32 ``[ceil(out / bn), ceil(in / bk)]``, one per block, the last
  block along a dimension possibly partial (DeepSeek-V3's own ``kv_a_proj_with_mqa`` is
  ``[576, 7168]`` with a ``[5, 56]`` scale). Dequantized weight = ``weight.float() * scale_inv``
  of its block.

Quantizing: ``scale = amax(|block|) / 448`` (1 for an all-zero block), ``q = (block / scale)
.clamp(-448, 448).to(float8_e4m3fn)``, ``scale_inv = scale``.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

from tests.hf_checkpoints import INDEX

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""largest finite float8_e4m3fn"""

SCALE_SUFFIX = ".weight_scale_inv"

QUANTIZED = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj",                             # attention
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",          # DeepSeek MLA
    "gate_proj", "up_proj", "down_proj",                                # dense MLP, experts, shared experts
    "w1", "w2", "w3",                                                   # mixtral experts
})
"""Leaf names of the linears whose ``.weight`` is quantized, inside ``model.layers.*``.

Left float32 (as in DeepSeek-V3 / Qwen3 FP8 releases): embeddings, ``lm_head``, norms, biases,
MoE routers (``mlp.gate``, ``block_sparse_moe.gate``), ``shared_expert_gate``,
``e_score_correction_bias``, DeepSeek's MTP ``eh_proj`` / ``shared_head`` (BF16 in DeepSeek-V3)."""


def is_quantized(name: str, shape) -> bool:
    """Whether the checkpoint tensor ``name`` of ``shape`` is stored as block FP8."""
    parts = name.split(".")
    return (len(shape) == 2 and name.startswith("model.layers.") and parts[-1] == "weight"
            and parts[-2] in QUANTIZED)


def scale_name(weight_name: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``."""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name[: -len(".weight")] + SCALE_SUFFIX


def scale_shape(shape, block) -> tuple[int, int]:
    """``[ceil(out / bn), ceil(in / bk)]``."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def quantize_block(weight: torch.Tensor, block=(16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(float8_e4m3fn weight, float32 scale_inv)`` of a 2-D weight (see the module doc).

    Pads to whole blocks with zeros (which leave every block's amax alone) and crops back."""
    out, inp = weight.shape
    bn, bk = block
    rows, cols = scale_shape(weight.shape, block)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    padded[:out, :inp] = weight.float()
    tiles = padded.view(rows, bn, cols, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(rows * bn, cols * bk)[:out, :inp].contiguous(), scale.contiguous()


def dequantize_block(weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """float32 ``weight_fp8 * scale_inv`` of each element's block (the last blocks may be partial)."""
    out, inp = weight_fp8.shape
    bn, bk = block
    assert tuple(scale_inv.shape) == scale_shape(weight_fp8.shape, block), (weight_fp8.shape, scale_inv.shape, block)
    expanded = scale_inv.float().repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:out, :inp]
    return weight_fp8.float() * expanded


def modules_to_not_convert(names) -> list[str]:
    """The linears left unquantized: ``lm_head`` (always, tied or not) and every module under
    ``model.layers.*`` with a 2-D ``.weight`` that is not quantized (routers, shared-expert gates)."""
    skip = {n[: -len(".weight")] for n in names if n.startswith("model.layers.") and n.endswith(".weight")}
    return ["lm_head"] + sorted(skip)


def write_block_fp8_checkpoint(src: str, dst: str, *, block=(16, 16)) -> str:
    """Copies the float32 checkpoint ``src`` (with an index) to ``dst``, every quantized weight
    replaced by its FP8 weight plus ``weight_scale_inv`` in the same shard, the rest unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    block = (int(block[0]), int(block[1]))
    index = _read_json(src, INDEX)
    weight_map = index["weight_map"]
    os.makedirs(dst, exist_ok=True)
    _copy_side_files(src, dst)

    new_map, total, unconverted = {}, 0, []
    for fname in sorted(set(weight_map.values())):
        tensors = {}
        with safe_open(os.path.join(src, fname), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if is_quantized(name, t.shape):
                    q, s = quantize_block(t, block)
                    tensors[name], tensors[scale_name(name)] = q, s
                else:
                    tensors[name] = t
                    if t.ndim == 2 and name.endswith(".weight"):
                        unconverted.append(name)
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            new_map[name] = fname
            total += t.numel() * t.element_size()
    assert set(weight_map) <= set(new_map), "the index names a tensor its shard lacks"
    index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total}, "weight_map": new_map}
    _write_json(dst, INDEX, index)

    config = _read_json(src, "config.json")
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block),
                                     "modules_to_not_convert": modules_to_not_convert(unconverted)}
    _write_json(dst, "config.json", config)
    return dst


def write_dequantized_checkpoint(fp8_dir: str, dst: str) -> str:
    """A float32 checkpoint (no quantization_config, no scales, same shards) whose quantized
    weights are ``dequantize_block`` of the FP8 checkpoint ``fp8_dir``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = _read_json(fp8_dir, "config.json")
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    index = _read_json(fp8_dir, INDEX)
    weight_map = index["weight_map"]
    os.makedirs(dst, exist_ok=True)
    _copy_side_files(fp8_dir, dst)

    new_map, total = {}, 0
    for fname in sorted(set(weight_map.values())):
        tensors = {}
        with safe_open(os.path.join(fp8_dir, fname), framework="pt") as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIX):
                    continue
                t = f.get_tensor(name)
                if t.dtype == FP8_DTYPE:
                    sname = scale_name(name)
                    with safe_open(os.path.join(fp8_dir, weight_map[sname]), framework="pt") as g:
                        t = dequantize_block(t, g.get_tensor(sname), block)
                tensors[name] = t
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            new_map[name] = fname
            total += t.numel() * t.element_size()
    index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total}, "weight_map": new_map}
    _write_json(dst, INDEX, index)
    _write_json(dst, "config.json", config)
    return dst


def _copy_side_files(src: str, dst: str) -> None:
    """Everything but the shards, the index and config.json (generation_config.json, ...)."""
    for fname in os.listdir(src):
        path = os.path.join(src, fname)
        if os.path.isfile(path) and not fname.endswith(".safetensors") and fname not in (INDEX, "config.json"):
            shutil.copy2(path, os.path.join(dst, fname))


def _read_json(directory: str, fname: str) -> dict:
    with open(os.path.join(directory, fname)) as f:
        return json.load(f)


def _write_json(directory: str, fname: str, obj: dict) -> None:
    with open(os.path.join(directory, fname), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
