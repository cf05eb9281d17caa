"""--dry-run at 4,096 ranks of checkpoints whose experts are packed per layer: gpt-oss-120b (bf16
form) and Llama-4-Maverick's text model, at their real sizes, as EP grows at a fixed world.

Each checkpoint is built from shapes alone, like dryrun_deepseek.py: real safetensors headers,
data areas left as holes (sparse files: no disk used, nothing read). For every EP size the dry
run plans each rank class; the benchmark prints the planning time, peak memory, units, and the
bytes per rank (min / median / max) against each rank's share computed here from the shapes:
a TP-split tensor's 1/tp (k/v: 1/min(tp, kv heads)), a replicated one whole, and of every packed
expert tensor of its stage 1/(ep x expert tp), i.e. 1/(ranks per stage), its down bias 1/ep.
At a fixed world a rank's share of the experts does not depend on how the stage splits into
expert groups, so the bytes per rank stay flat as EP grows.

    .venv/bin/python benchmarks/dryrun_packed.py --model gpt-oss-120b [--world 4096 --tp 8 --pp 4]
           [--ep 16 32 64 128] [--dir DIR]
    .venv/bin/python benchmarks/dryrun_packed.py --model llama4-maverick [--pp 1 --ep 16 32 64 128]

Prints one JSON line per EP size and writes benchmarks/results/dryrun_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.dryrun_deepseek import SIZES, write_header_only  # noqa: E402

GPT_OSS_120B = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "dtype": "bfloat16", "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4,
    "sliding_window": 128, "attention_bias": True, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "swiglu_limit": 7.0, "hidden_act": "silu",
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(36)],
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096}, "rope_theta": 150000,
}
"""openai/gpt-oss-120b's config.json, less its MXFP4 quantization_config (the bf16 form)"""

MAVERICK = {
    "model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"], "dtype": "bfloat16", "vocab_size": 202048,
    "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_hidden_layers": 48,
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 128,
    "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "use_qk_norm": False, "attention_chunk_size": 8192,
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "max_position_embeddings": 1048576, "hidden_act": "silu",
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
}
"""the text_config of meta-llama/Llama-4-Maverick-17B-128E, as a llama4_text config.json"""


def attention(p: str, c: dict, bias: bool) -> dict:
    h, hd, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    a = p + "self_attn."
    out = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
           a + "q_proj.weight": (heads * hd, h), a + "k_proj.weight": (kv * hd, h), a + "v_proj.weight": (kv * hd, h),
           a + "o_proj.weight": (h, heads * hd)}
    if bias:
        out.update({a + "q_proj.bias": (heads * hd,), a + "k_proj.bias": (kv * hd,), a + "v_proj.bias": (kv * hd,),
                    a + "o_proj.bias": (h,)})
    return out


def shapes_of(c: dict) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of the config (bf16)."""
    h, e, i = c["hidden_size"], c["num_local_experts"], c["intermediate_size"]
    out = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
           "lm_head.weight": (c["vocab_size"], h)}
    layers = c["num_hidden_layers"]
    for n in range(layers):
        p = f"model.layers.{n}."
        if c["model_type"] == "gpt_oss":
            out.update(attention(p, c, bias=True))
            m = p + "mlp."
            out.update({p + "self_attn.sinks": (c["num_attention_heads"],), m + "router.weight": (e, h),
                        m + "router.bias": (e,), m + "experts.gate_up_proj": (e, h, 2 * i),
                        m + "experts.gate_up_proj_bias": (e, 2 * i), m + "experts.down_proj": (e, i, h),
                        m + "experts.down_proj_bias": (e, h)})
            continue
        out.update(attention(p, c, bias=False))
        f = p + "feed_forward."
        step = c["interleave_moe_layer_step"]
        if n % step == step - 1:
            out.update({f + "router.weight": (e, h), f + "experts.gate_up_proj": (e, h, 2 * i),
                        f + "experts.down_proj": (e, i, h), f + "shared_expert.gate_proj.weight": (i, h),
                        f + "shared_expert.up_proj.weight": (i, h), f + "shared_expert.down_proj.weight": (h, i)})
        else:
            d = c["intermediate_size_mlp"]
            out.update({f + "gate_proj.weight": (d, h), f + "up_proj.weight": (d, h), f + "down_proj.weight": (h, d)})
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    size = SIZES["BF16"]
    for d in shape:
        size *= d
    return size


def stage_share(shapes: dict, c: dict, *, tp: int, pp: int, ep: int, stage: int, world: int) -> int:
    """The bytes one rank of ``stage`` must read, from the shapes alone (see the module docstring)."""
    layers = c["num_hidden_layers"]
    per = [layers // pp + (s < layers % pp) for s in range(pp)]
    first = sum(per[:stage])
    mine = range(first, first + per[stage])
    ranks = world // pp
    total = 0
    for name, shape in shapes.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) not in mine:
                continue
        elif name == "model.embed_tokens.weight":
            if stage != 0:
                continue
        elif stage != pp - 1:  # the final norm and the LM head
            continue
        size = nbytes(shape)
        if ".experts." in name:
            total += size // (ep if name.endswith("down_proj_bias") else ranks)
        elif any(k in name for k in ("k_proj.", "v_proj.")):
            total += size // min(tp, c["num_key_value_heads"])
        elif name.endswith(("q_proj.weight", "q_proj.bias", "o_proj.weight", ".sinks", "embed_tokens.weight",
                            "lm_head.weight")) or any(k in name for k in ("gate_proj.", "up_proj.", "down_proj.")):
            total += size // tp
        else:
            total += size
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("gpt-oss-120b", "llama4-maverick"), required=True)
    ap.add_argument("--world", type=int, default=4096)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--ep", type=int, nargs="+")
    ap.add_argument("--dir")
    args = ap.parse_args()
    from distload.config import LoadConfig
    from distload.dryrun import dry_run

    gpt = args.model == "gpt-oss-120b"
    config = GPT_OSS_120B if gpt else MAVERICK
    pp = args.pp or (4 if gpt else 1)
    eps = args.ep or [16, 32, 64, 128]
    shapes = shapes_of(config)
    directory = args.dir or tempfile.mkdtemp(prefix=f"distload-{args.model}-")
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(os.path.join(directory, "config.json")):
        write_header_only(directory, {n: (s, "BF16") for n, s in shapes.items()}, config,
                          num_files=15 if gpt else 55)
    results = []
    for ep in eps:
        start = time.perf_counter()
        report = dry_run(directory, LoadConfig(tp=args.tp, pp=pp, ep=ep), world_size=args.world)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        per = sorted(r.bytes_read for r in report.ranks)
        ratios = [r.bytes_read / stage_share(shapes, config, tp=args.tp, pp=pp, ep=ep, stage=dict(r.coords)["pp"],
                                             world=args.world) for r in report.ranks]
        result = {"benchmark": f"dryrun_{args.model}", "world": args.world, "tp": args.tp, "pp": pp, "ep": ep,
                  "expert_tp": args.world // pp // ep, "tensors": len(shapes),
                  "checkpoint_bytes": sum(nbytes(s) for s in shapes.values()), "units": report.num_units,
                  "complete": report.complete, "unexpected": len(report.unexpected), "seconds": round(seconds, 2),
                  "peak_rss_gib": round(peak / 2**30, 3), "rank_classes": report.extra.get("planned_rank_classes"),
                  "bytes_per_rank_min": per[0], "bytes_per_rank_median": per[len(per) // 2],
                  "bytes_per_rank_max": per[-1], "max_over_share": round(max(ratios), 4),
                  "min_over_share": round(min(ratios), 4)}
        print(json.dumps(result), flush=True)
        results.append(result)
    out = os.path.join(os.path.dirname(__file__), "results", f"dryrun_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0 if all(r["complete"] and r["max_over_share"] <= 1.001 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
