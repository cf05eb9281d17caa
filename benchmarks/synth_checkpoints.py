"""Deterministic synthetic bf16 checkpoints in the Hugging Face layout, for the load benchmarks.

What it makes: ``config.json`` (a real transformers-style config that distload's reference
models accept), the tensors a Hugging Face checkpoint of that config holds, named, shaped and
ordered as transformers' ``state_dict`` orders them, sharded as ``save_pretrained`` shards them
(in that order, a new file started when the next tensor would pass ``max_shard_size``, decimal
units: "3GB" is 3e9 bytes; one shard is a plain ``model.safetensors`` without an index), each
file written by ``safetensors.torch.save_file`` with ``{"format": "pt"}``, and
``model.safetensors.index.json`` (``metadata.total_size``, ``metadata.total_parameters``, a
sorted ``weight_map``). Values are a seeded random bf16 block tiled from a per-tensor offset:
never all zeros, different for every tensor and every row, cheap to make (a memory copy).

MoE experts are stored per expert (``experts.{e}.gate_proj.weight``, ...), in module order, as
the released Qwen3-MoE checkpoints (written by transformers 4.x) hold them; transformers 5 keeps
experts fused in memory and, converting them back on save, writes its shards in name order.

A directory is reused when its ``config.json`` matches the preset and its completion marker
(``.synth-complete``, written last) names the same preset and shard size.

Run from the repository root:
    .venv/bin/python -m benchmarks.synth_checkpoints --preset llama-1.4g [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

MARKER = ".synth-complete"
INDEX = "model.safetensors.index.json"
PERIOD = 1_000_003
"""elements in the tiled random block: a prime longer than any row, so no two rows match"""

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
          "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02, "mlp_bias": False,
          "max_position_embeddings": 4096, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "use_cache": True, "dtype": "bfloat16",
          "bos_token_id": 1, "eos_token_id": 2}
_QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
              "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
              "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_cache": True,
              "dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
              "output_router_logits": False, "router_aux_loss_coef": 0.001, "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": 48, "max_position_embeddings": 40960,
              "bos_token_id": 151643, "eos_token_id": 151645}


def _llama(**sizes) -> dict:
    return {**_LLAMA, **sizes}


PRESETS: dict[str, dict] = {
    "tiny": {"max_shard_size": "8MB", "config": _llama(
        hidden_size=512, intermediate_size=1408, num_attention_heads=16, num_key_value_heads=8, head_dim=32,
        num_hidden_layers=2, vocab_size=4096)},
    "llama-1.4g": {"max_shard_size": "1GB", "config": _llama(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        num_hidden_layers=13, vocab_size=32000)},
    "llama8b-7g": {"max_shard_size": "3GB", "config": _llama(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=12, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=128001)},
    # the same layers, 64 of them (30.0 GB in 2 GB files): the multi-GPU runs (scripts/multigpu)
    "llama8b-30g": {"max_shard_size": "2GB", "config": _llama(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=64, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=128001)},
    "qwen3moe-tiny": {"max_shard_size": "2MB", "config": {**_QWEN3_MOE,
        "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 8,
        "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_hidden_layers": 2, "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2}},
    "qwen3moe-small": {"max_shard_size": "1GB", "config": {**_QWEN3_MOE,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_hidden_layers": 2, "vocab_size": 151936}},
}
"""preset name -> config.json and the ``max_shard_size`` it is saved with"""


def parse_size(size: str | int) -> int:
    """Bytes of a ``max_shard_size`` as huggingface_hub reads it ("5GB" = 5e9, "5GiB" = 5 * 2**30)."""
    if isinstance(size, int):
        return size
    units = {"TIB": 2 ** 40, "GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10,
             "TB": 10 ** 12, "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Hugging Face checkpoint of ``config``, in ``state_dict`` order."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    moe = config["model_type"] == "qwen3_moe"
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                    p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd)})
        if moe:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if moe and i not in set(config.get("mlp_only_layers") or ()):
            inter = config["moe_intermediate_size"]
            out[p + "mlp.gate.weight"] = (config["num_experts"], h)
            for e in range(config["num_experts"]):
                q = f"{p}mlp.experts.{e}."
                out.update({q + "gate_proj.weight": (inter, h), q + "up_proj.weight": (inter, h),
                            q + "down_proj.weight": (h, inter)})
        else:
            inter = config["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                        p + "mlp.down_proj.weight": (h, inter)})
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, h)
    return out


def shard_names(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Splits names into files as huggingface_hub's ``split_state_dict_into_shards`` does."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if n > max_bytes:  # a tensor larger than a shard gets a file of its own
            shards.append([name])
            continue
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


_BLOCK: dict[torch.dtype, torch.Tensor] = {}


def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The values of tensor ``name``: a fixed random block, rotated by a hash of the name, tiled."""
    if dtype not in _BLOCK:
        gen = torch.Generator().manual_seed(20240601)
        _BLOCK[dtype] = torch.randn(PERIOD, generator=gen).to(dtype)
    block = _BLOCK[dtype]
    n = math.prod(shape)
    start = zlib.crc32(name.encode()) % PERIOD
    rotated = torch.cat([block[start:], block[:start]])
    flat = rotated[:n].clone() if n <= PERIOD else rotated.repeat(-(-n // PERIOD))[:n]
    return flat.reshape(shape)


def file_names(num: int) -> list[str]:
    if num == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num:05d}.safetensors" for i in range(num)]


def write_checkpoint(directory: str, config: dict, max_shard_size: str | int, *,
                     dtype: torch.dtype = torch.bfloat16, threads: int | None = None) -> dict:
    """Writes the checkpoint of ``config`` into ``directory`` (created). Returns its summary."""
    os.makedirs(directory, exist_ok=True)
    shapes = tensor_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = shard_names(shapes, itemsize, parse_size(max_shard_size))
    names = file_names(len(shards))
    threads = threads or _writer_threads(shapes, shards, itemsize)

    def write(i: int) -> None:
        tensors = {n: fill(n, shapes[n], dtype) for n in shards[i]}
        path = os.path.join(directory, names[i])
        from safetensors.torch import save_file
        save_file(tensors, path, metadata={"format": "pt"})
        with open(path, "rb") as f:  # so that cold-cache runs can evict it (dirty pages stay)
            os.fsync(f.fileno())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(shards))))
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    if len(shards) > 1:
        weight_map = {n: names[i] for i, part in enumerate(shards) for n in part}
        index = {"metadata": {"total_parameters": total // itemsize, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, INDEX), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"directory": directory, "files": names, "tensors": len(shapes), "total_size": total}


def write_headers_only(directory: str, config: dict, max_shard_size: str | int) -> dict:
    """The same files with real safetensors headers and the data areas left as holes (sparse
    files, all zeros): for planning checks (``--dry-run``) of full-size presets, never for loads."""
    import struct
    os.makedirs(directory, exist_ok=True)
    shapes = tensor_shapes(config)
    shards = shard_names(shapes, 2, parse_size(max_shard_size))
    names = file_names(len(shards))
    for part, fname in zip(shards, names):
        header, cursor = {"__metadata__": {"format": "pt"}}, 0
        for n in sorted(part):  # safetensors orders one dtype's tensors by name
            size = math.prod(shapes[n]) * 2
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [cursor, cursor + size]}
            cursor += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + cursor)
    weight_map = {n: names[i] for i, part in enumerate(shards) for n in part}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return {"directory": directory, "files": names, "tensors": len(shapes), "total_size": total}


def _writer_threads(shapes: dict, shards: list[list[str]], itemsize: int) -> int:
    """Files written at once: up to 4, as many as half the free memory holds (a shard's tensors live
    in memory while it is written)."""
    largest = max(sum(math.prod(shapes[n]) for n in part) * itemsize for part in shards)
    free = _mem_available()
    by_memory = max(1, int(free // 2 // max(largest, 1))) if free else 1
    return max(1, min(4, len(shards), by_memory, os.cpu_count() or 1))


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_root() -> str:
    base = os.environ.get("DISTLOAD_BENCH_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distload-bench")
    return base


def ensure_checkpoint(preset: str, directory: str | None = None) -> str:
    """Returns the directory of ``preset``'s checkpoint, writing it unless a complete one is there.

    It is written into a sibling temporary directory and renamed into place, so an interrupted
    write never looks complete.
    """
    spec = PRESETS[preset]
    directory = directory or os.path.join(default_root(), preset)
    marker = {"preset": preset, "max_shard_size": spec["max_shard_size"]}
    if _is_complete(directory, spec["config"], marker):
        return directory
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, spec["config"], spec["max_shard_size"])
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(marker, f)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    return directory


def _is_complete(directory: str, config: dict, marker: dict) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            same_config = json.load(f) == json.loads(json.dumps(config))
        with open(os.path.join(directory, MARKER)) as f:
            return same_config and json.load(f) == marker
    except (OSError, ValueError):
        return False


def weight_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files (absolute paths, sorted)."""
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--dir", help=f"checkpoint directory (default: {default_root()}/PRESET)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    directory = ensure_checkpoint(args.preset, args.dir)
    files = weight_files(directory)
    size = sum(os.path.getsize(f) for f in files)
    print(json.dumps({"preset": args.preset, "directory": directory, "files": len(files), "bytes": size,
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
