"""The bundled example checkpoint: a tiny Llama written deterministically on first use."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch

from .checkpoint.files import reason
from .errors import CheckpointError, DistloadError

EXAMPLE_NAME = "example-llama-v1"
EXAMPLE_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
"""the example's weight files: the first half of its tensors (in ``example_tensors`` order), then the rest"""
EXAMPLE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
    "vocab_size": 250, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    "max_position_embeddings": 256, "hidden_act": "silu",
}


def cache_dir() -> str:
    """``$DISTLOAD_CACHE``, else ``$XDG_CACHE_HOME/distload``, else ``~/.cache/distload``."""
    if os.environ.get("DISTLOAD_CACHE"):
        return os.environ["DISTLOAD_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distload")


def example_checkpoint(*, timeout: float = 120.0) -> str:
    """Returns the example checkpoint's directory, writing it on first use.

    Local rank 0 writes it into a temporary directory and renames it into place;
    other local ranks wait for the rename. Same bytes on every machine (fixed seed).

    Raises:
        CheckpointError: the cache directory (``cache_dir()``) cannot hold it: not a
            directory, not writable, or the disk is full; names the directory.

    Example:
        >>> import os
        >>> os.path.exists(os.path.join(example_checkpoint(), "config.json"))
        True
    """
    target = os.path.join(cache_dir(), EXAMPLE_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        from safetensors import SafetensorError

        cache = cache_dir()
        try:
            os.makedirs(cache, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{EXAMPLE_NAME}-", dir=cache)
        except OSError as err:
            raise _unusable_cache(cache, err) from None
        try:
            write_example(tmp)
            os.rename(tmp, target)
        except (OSError, SafetensorError) as err:  # the library reports a full disk as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isfile(os.path.join(target, "config.json")):  # else: lost a race to another writer
                raise _unusable_cache(cache, err) from None
        return target
    deadline = time.monotonic() + timeout
    while not os.path.isfile(os.path.join(target, "config.json")):
        if time.monotonic() > deadline:
            raise DistloadError(f"waited {timeout:.0f} s for local rank 0 to write the example checkpoint",
                                file=target)
        time.sleep(0.1)
    return target


def _unusable_cache(cache: str, err: Exception) -> CheckpointError:
    if os.path.lexists(cache) and not os.path.isdir(cache):
        why = "it exists and is not a directory"
    else:
        why = reason(err) if isinstance(err, OSError) else (str(err).splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"cannot write the example checkpoint into its cache directory: {why} "
                           "(set DISTLOAD_CACHE to a writable directory)", file=cache)


def example_tensors(config: dict = EXAMPLE_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Returns the example's tensors, Hugging Face names, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    c = config
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    dtype = getattr(torch, c["dtype"])

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(dtype)

    out = {"model.embed_tokens.weight": rand(c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                    p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                    p + "mlp.down_proj.weight": rand(h, inter),
                    p + "input_layernorm.weight": (1 + rand(h)).to(dtype),
                    p + "post_attention_layernorm.weight": (1 + rand(h)).to(dtype)})
    out["model.norm.weight"] = (1 + rand(h)).to(dtype)
    out["lm_head.weight"] = rand(c["vocab_size"], h)
    return out


def write_example(directory: str) -> None:
    """Writes the example as two safetensors shards plus index and config.json."""
    from safetensors.torch import save_file

    tensors = example_tensors()
    names = list(tensors)
    halves = {EXAMPLE_SHARDS[0]: names[: len(names) // 2], EXAMPLE_SHARDS[1]: names[len(names) // 2:]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(directory, fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(EXAMPLE_CONFIG, f, indent=2, sort_keys=True)
