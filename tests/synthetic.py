"""Synthetic Llama-shaped checkpoints for pure tests: header metadata only (no data files),
and a small writer of real safetensors files for the load benchmarks.

The Hugging Face names and shapes are spelled out here independently of distload's
models, so a planner test compares two separate descriptions of the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import torch

from distload.checkpoint.header import TensorInfo
from distload.layout import Layout
from distload.models import build_model
from distload.plan import Plan, plan
from distload.spec import ParamSpec, collect_specs

HEADER_BYTES = 4096
"""pretend size of each file's 8-byte length + JSON header (data starts after it)"""


def llama_config(**overrides) -> dict:
    """A small Llama config.json; override any field."""
    cfg = {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 16,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    cfg.update(overrides)
    return cfg


def hf_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Returns the tensor names and shapes a Hugging Face Llama checkpoint of ``cfg`` holds."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    out["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    return out


def tensor_infos(shapes: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype = torch.bfloat16,
                 num_files: int = 2, directory: str = "/synthetic") -> dict[str, TensorInfo]:
    """Lays ``shapes`` out back to back in ``num_files`` pretend files (round robin by name)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cursor = [HEADER_BYTES] * num_files
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        f = i % num_files
        n = math.prod(shape) * itemsize
        out[name] = TensorInfo(name=name, file=f"{directory}/model-{f + 1:05d}-of-{num_files:05d}.safetensors",
                               dtype=dtype, shape=tuple(shape), begin=cursor[f], end=cursor[f] + n)
        cursor[f] += n
    return out


def llama_specs(cfg: Mapping, tp: int) -> tuple[ParamSpec, ...]:
    """distload's specs of the reference model for ``cfg`` at ``tp`` (built on meta)."""
    return collect_specs(build_model(cfg, tp=tp, device="meta"))


def llama_plan(cfg: Mapping, layout: Layout, *, drop: Iterable[str] = (),
               extra: Mapping[str, tuple[int, ...]] | None = None, ignore: Iterable[str] = ()) -> Plan:
    """Plans ``cfg`` at ``layout`` against a synthetic checkpoint missing ``drop`` and holding ``extra``."""
    shapes = {n: s for n, s in hf_shapes(cfg).items() if n not in set(drop)}
    shapes.update(extra or {})
    return plan(tensor_infos(shapes), llama_specs(cfg, layout.tp), layout, ignore=ignore)


def write_llama_checkpoint(directory: str, cfg: Mapping, *, dtype: torch.dtype = torch.bfloat16,
                           num_files: int = 2) -> dict[str, tuple[int, ...]]:
    """Writes a Llama checkpoint of ``cfg`` (cheap deterministic values) as sharded safetensors.

    Returns the names and shapes written.
    """
    from safetensors.torch import save_file

    shapes = hf_shapes(cfg)
    names = list(shapes)
    per_file = -(-len(names) // num_files)
    weight_map = {}
    for f in range(num_files):
        fname = f"model-{f + 1:05d}-of-{num_files:05d}.safetensors"
        part = names[f * per_file:(f + 1) * per_file]
        tensors = {}
        for j, name in enumerate(part):
            n = math.prod(shapes[name])
            # values differ per tensor and per position; no RNG needed for byte accounting
            tensors[name] = (torch.arange(n, dtype=torch.float32).remainder_(251).mul_(1 / 251)
                             .add_(j).to(dtype).reshape(shapes[name]))
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump({**cfg, "dtype": str(dtype).removeprefix("torch.")}, fh)
    return shapes


def reference_plan(cfg: Mapping, layout: Layout, *, kind: str = "linear", redundant: int = 0,
                   drop: Iterable[str] = ()) -> Plan:
    """The plan of distload's reference model of ``cfg`` (a mixture of experts: ``kind`` placement
    with ``redundant`` copies) for ``layout`` (one stage), from headers made here of every tensor
    its specs name, minus ``drop``."""
    from distload.comm import SOLO, Collectives
    from distload.experts import ExpertPlan
    from distload.models import BuildContext, expert_facts, reference_model

    experts = ExpertPlan.make(num_experts=expert_facts(cfg).num_experts, ep=layout.ep, kind=kind, redundant=redundant)
    model = reference_model(BuildContext(config=cfg, tp=layout.tp, tp_rank=0, ops=Collectives(None, layout.tp),
                                         dtype=torch.float32, layout=layout, experts=experts, stage_ops=SOLO))
    specs = collect_specs(model)
    shapes = {}
    for spec in specs:
        for src in (*spec.sources, *spec.verify):
            shapes[src.name] = src.shape
        if spec.experts is not None:
            for e in range(spec.experts.placement.num_experts):
                for part in spec.experts.parts:
                    shapes[spec.experts.name(part, e)] = part.shape
    for name in drop:
        shapes.pop(name)
    return plan(tensor_infos(shapes, dtype=torch.float32, num_files=4), specs, layout)
