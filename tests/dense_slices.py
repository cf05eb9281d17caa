"""What each TP rank of a Llama-family decoder must hold, sliced from the checkpoint by head / row /
column arithmetic written for the tests (not by distload's planner). Shared by the tests of
checkpoints whose q/k/v and gate/up are separate tensors on disk (llama, qwen, mistral, gemma3).
"""

from __future__ import annotations

import re

import torch

LAYER = re.compile(r"model\.layers\.(\d+)\.")


def expected_params(ckpt: dict[str, torch.Tensor], spec, tp: int, tp_i: int, *, layers: range | None = None,
                    first: bool = True, last: bool = True, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters TP rank ``tp_i`` of ``tp`` must hold, by name.

    qkv = [rows of this rank's query heads; rows of the KV head(s) those query heads attend to;
    the same for v]; gate_up = [gate row block; up row block]; o_proj and down_proj take column
    blocks; vocabulary rows come in blocks of ceil(V / tp) with zero rows at the end of the last
    block(s); everything else (norms, biases of row-parallel layers) is whole.

    Args:
        spec: the text model's sizes (``HFSpec``: head_dim, heads, KV heads, vocabulary, tying).
        layers: the decoder layers of this rank's pipeline stage (default: all).
        first, last: the stage holds the embedding / the final norm and LM head.
        prefix: what the checkpoint puts before the text model's names (a multimodal wrapper's
            ``language_model.``); the model's parameter names carry it too, other tensors are not
            the text model's.
    """
    hd, heads, kv_heads = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    my_heads = range(tp_i * heads // tp, (tp_i + 1) * heads // tp)
    my_kv = sorted({h // (heads // kv_heads) for h in my_heads})  # GQA: query head h reads KV head h // group

    def head_rows(t: torch.Tensor, which) -> torch.Tensor:
        return torch.cat([t[h * hd:(h + 1) * hd] for h in which])

    def block(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // tp
        return t.narrow(dim, tp_i * n, n)

    def vocab_rows(t: torch.Tensor) -> torch.Tensor:
        n = -(-spec.vocab_size // tp)
        out = torch.zeros(n, t.shape[1], dtype=t.dtype)
        part = t[tp_i * n:(tp_i + 1) * n]
        out[:len(part)] = part
        return out

    out: dict[str, torch.Tensor] = {}
    for name, t in ckpt.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        layer = LAYER.match(local)
        if layer is None:
            keep = first if local == "model.embed_tokens.weight" else last
            if keep:
                out[name] = vocab_rows(t) if local in ("model.embed_tokens.weight", "lm_head.weight") else t
            continue
        if layers is not None and int(layer.group(1)) not in layers:
            continue
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf == "q_proj":
            out[f"{parent}.qkv_proj.{kind}"] = torch.cat([
                head_rows(t, my_heads), head_rows(ckpt[f"{parent}.k_proj.{kind}"], my_kv),
                head_rows(ckpt[f"{parent}.v_proj.{kind}"], my_kv)])
        elif leaf == "gate_proj":
            out[f"{parent}.gate_up_proj.{kind}"] = torch.cat([block(t, 0), block(ckpt[f"{parent}.up_proj.{kind}"], 0)])
        elif leaf in ("k_proj", "v_proj", "up_proj"):
            continue  # parts of the fused parameters above
        elif kind == "weight" and leaf == "o_proj":
            out[name] = torch.cat([t[:, h * hd:(h + 1) * hd] for h in my_heads], dim=1)
        elif kind == "weight" and leaf == "down_proj":
            out[name] = block(t, 1)
        else:
            out[name] = t
    if last and spec.tie_word_embeddings:
        out[prefix + "lm_head.weight"] = vocab_rows(ckpt[prefix + "model.embed_tokens.weight"])
    return out
