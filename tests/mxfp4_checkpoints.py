"""gpt-oss MXFP4 checkpoints written here from the format's definition (as OpenAI's released
checkpoints store it and transformers 5's ``integrations/mxfp4.py`` reads it), and transformers'
own reading of them.

The format: each layer's experts keep ``gate_up_proj_bias`` and ``down_proj_bias``; the matrices
are stored output-major, ``W [E, out, in]`` (``gate_up_proj [E, H, 2I]`` transposed: rows gate,
up, gate, up, ...; ``down_proj [E, I, H]`` transposed), cut along the inputs into blocks of 32:

* ``*_blocks`` uint8 ``[E, out, in / 32, 16]``: byte ``k`` of a block holds value ``2k`` in its low
  nibble and ``2k + 1`` in its high nibble, each an e2m1 code (sign bit 3, then 2 exponent bits and
  1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6);
* ``*_scales`` uint8 ``[E, out, in / 32]``: e8m0, the block's scale ``2^(byte - 127)``.

Quantizing follows the OCP MX rule: a block's shared exponent is ``floor(log2(amax)) - 2`` (2 is
e2m1's largest exponent), each value ``w / 2^x`` rounded to the nearest e2m1 magnitude (ties to the
even code) and saturated at 6. Everything else (attention, router, embeddings, norms, head,
biases) stays as the float checkpoint stores it; config.json gets the released models'
``quantization_config``.

Builders run in the test process: they import transformers.
"""

from __future__ import annotations

import json
import math
import os

import torch

from tests.hf_checkpoints import read_tensors, save_float_twin

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""magnitudes of the e2m1 codes 0..7 (code 8 + k is -E2M1[k])"""
BLOCK = 32
"""values per scale"""
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
"""``modules_to_not_convert`` of the released gpt-oss configs"""
PACKED = ("gate_up_proj", "down_proj")
"""each layer's expert matrices, stored as ``<name>_blocks`` / ``<name>_scales``"""


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks uint8 [..., in / 32, 16], scales uint8 [..., in / 32])`` of ``w [..., in]``."""
    v = w.double().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = v.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -140))) - 2, torch.zeros_like(amax))
    exp = exp.clamp(-127, 127)
    scaled = (v / torch.pow(2.0, exp)[..., None]).abs().clamp(max=6.0)
    grid = torch.tensor(E2M1, dtype=torch.float64)
    odd = torch.arange(8, dtype=torch.float64) % 2
    # nearest magnitude; a tie goes to the even code (below any real gap between two distances)
    code = ((scaled[..., None] - grid).abs() + odd * 1e-12).argmin(dim=-1)
    code = code + 8 * (v < 0).long() * (code > 0).long()  # negative zero is stored as +0
    pairs = code.reshape(*code.shape[:-1], BLOCK // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def value(blocks: torch.Tensor, scales: torch.Tensor, index: tuple[int, ...], col: int) -> float:
    """``W[index..., col]`` worked out with Python ints and floats: the byte, its nibble, the
    code's magnitude and sign, times two to the scale byte minus 127."""
    byte = int(blocks[(*index, col // BLOCK, (col % BLOCK) // 2)])
    code = (byte >> 4) if col % 2 else (byte & 0x0F)
    magnitude = E2M1[code & 7]
    return (-magnitude if code & 8 else magnitude) * 2.0 ** (int(scales[(*index, col // BLOCK)]) - 127)


def write_mxfp4_checkpoint(src: str, dst: str) -> str:
    """Writes the float gpt-oss checkpoint ``src`` with its experts' matrices in MXFP4."""
    tensors = read_tensors(src)
    out = {}
    for name, t in tensors.items():
        stem, _, attr = name.rpartition(".")
        if attr in PACKED and stem.endswith(".mlp.experts"):
            blocks, scales = quantize(t.float().transpose(1, 2))  # [E, in, out] -> (out, in)
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = t
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    return save_float_twin(src, dst, out, config)


def hf_mxfp4_model(directory: str):
    """transformers' gpt-oss model of an MXFP4 checkpoint, its experts dequantized by transformers'
    own MXFP4 code (``Mxfp4Config(dequantize=True)``: pure torch, it runs on the CPU) in float32."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=Mxfp4Config(dequantize=True))
    return model.eval()


def hf_mxfp4_logits(directory: str, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 logits of ``hf_mxfp4_model``."""
    with torch.no_grad():
        return hf_mxfp4_model(directory)(input_ids).logits.float()


def blocks_per_rank(features: int, tp: int) -> list[int]:
    """Whole blocks of 32 each of ``tp`` ranks holds of ``features``: ``ceil(blocks / tp)``, the last
    ones fewer or none (worked out here, not by distload)."""
    blocks = math.ceil(features / BLOCK)
    each = math.ceil(blocks / tp)
    return [max(0, min(each, blocks - k * each)) for k in range(tp)]


def feature_range(features: int, tp: int, shard: int) -> tuple[int, int, int]:
    """``(first feature, features held, features padded to)`` of expert-TP shard ``shard`` of ``tp``."""
    counts = blocks_per_rank(features, tp)
    return sum(counts[:shard]) * BLOCK, min(counts[shard] * BLOCK, features), max(counts) * BLOCK


def _padded(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)


def expert_slices(ckpt: dict[str, torch.Tensor], prefix: str, experts: list[int], shard: int, etp: int,
                  intermediate: int) -> dict[str, torch.Tensor]:
    """What the local slots of ``experts`` (shard ``shard`` of ``etp``) hold of the experts layer
    ``prefix`` (``model.layers.N.mlp.experts.``): each expert's rows of ``gate_up_proj_*`` (2 a feature,
    gate and up) and of the gate/up bias, its input blocks of ``down_proj_*``, each zero-padded to
    the longest shard; ``down_proj_bias`` whole."""
    first, held, padded = feature_range(intermediate, etp, shard)
    out = {}
    for name, t in ((n, ckpt[prefix + n]) for n in ("gate_up_proj_blocks", "gate_up_proj_scales",
                                                     "gate_up_proj_bias", "down_proj_blocks", "down_proj_scales",
                                                     "down_proj_bias")):
        if name.startswith("gate_up"):
            dim, lo, n, size = 0, 2 * first, 2 * held, 2 * padded
        elif name == "down_proj_bias":
            dim = None
        else:
            dim, lo, n, size = 1, first // BLOCK, held // BLOCK, padded // BLOCK
        pieces = [t[e] if dim is None else _padded(t[e].narrow(dim, lo, n), dim, size) for e in experts]
        out[prefix + name] = torch.stack(pieces)
    return out
