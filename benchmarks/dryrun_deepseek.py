"""--dry-run of a DeepSeek-V3-shaped checkpoint at 4,096 ranks: planning time and peak memory.

The checkpoint is built from shapes alone: real DeepSeek-V3 sizes (61 layers, 256 routed
experts, an MTP layer, tens of thousands of tensors over 163 files), safetensors headers
written for real, and each file's data area left as a hole (a sparse file: no disk used,
no data read, since a dry run reads headers only). Weights are bf16, or with ``--fp8`` as
the released checkpoint stores them: every projection of the decoder layers F8_E4M3 with a
float32 ``weight_scale_inv`` per 128 x 128 block, and ``quant_method: fp8`` in config.json; or
with ``--int4`` as an llm-compressor W4A16 checkpoint: compressed-tensors ``pack-quantized``,
``weight_packed`` I32 ``[out, in / 8]``, a bf16 ``weight_scale`` per 128 inputs and an I64
``weight_shape`` per projection.

    .venv/bin/python benchmarks/dryrun_deepseek.py [--world 4096 --tp 8 --ep 256] [--fp8 | --int4] [--dir DIR]

Prints one JSON line and writes benchmarks/results/dryrun_deepseek[_fp8|_int4].json. Target: under
30 s and 2 GiB peak memory on the 2-core, 24 GiB development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time

CONFIG = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "dtype": "bfloat16",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "head_dim": 64,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
"""DeepSeek-V3's own quantization_config"""
INT4_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                             "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": 128, "dynamic": False}}},
               "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*eh_proj$"]}
"""an llm-compressor W4A16 recipe's quantization_config (group 128, symmetric)"""
SIZES = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "I32": 4, "I64": 8}


def to_fp8(shapes: dict) -> dict:
    """The released layout: decoder-layer projections FP8 with block scales (routers, norms,
    embeddings and the LM head as they were)."""
    out = {}
    for name, (shape, dtype) in shapes.items():
        if name.startswith("model.layers.") and name.endswith(("proj.weight", "proj_with_mqa.weight")) \
                and "eh_proj" not in name:
            out[name] = (shape, "F8_E4M3")
            out[name[:-len("weight")] + "weight_scale_inv"] = ((-(-shape[0] // 128), -(-shape[1] // 128)), "F32")
        else:
            out[name] = (shape, dtype)
    return out


def to_int4(shapes: dict) -> dict:
    """The W4A16 layout: decoder-layer projections packed int4 with group-128 scales (the rest as it was)."""
    out = {}
    for name, (shape, dtype) in shapes.items():
        if name.startswith("model.layers.") and name.endswith(("proj.weight", "proj_with_mqa.weight")) \
                and "eh_proj" not in name:
            base = name[:-len("weight")]
            out[base + "weight_packed"] = ((shape[0], shape[1] // 8), "I32")
            out[base + "weight_scale"] = ((shape[0], shape[1] // 128), "BF16")
            out[base + "weight_shape"] = ((2,), "I64")
        else:
            out[name] = (shape, dtype)
    return out


def tensor_shapes(c: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every checkpoint tensor of the config, with its safetensors dtype (routers stay F32)."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = {"model.embed_tokens.weight": ((c["vocab_size"], h), "BF16"), "model.norm.weight": ((h,), "BF16"),
           "lm_head.weight": ((c["vocab_size"], h), "BF16")}
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                 a + "q_a_proj.weight": (c["q_lora_rank"], h), a + "q_a_layernorm.weight": (c["q_lora_rank"],),
                 a + "q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
                 a + "kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
                 a + "kv_a_layernorm.weight": (c["kv_lora_rank"],),
                 a + "kv_b_proj.weight": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
                 a + "o_proj.weight": (h, heads * c["v_head_dim"])}
        if i < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            layer.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                          p + "mlp.down_proj.weight": (h, inter)})
        else:
            inter = c["moe_intermediate_size"]
            for e in range(c["n_routed_experts"]):
                q = f"{p}mlp.experts.{e}."
                layer.update({q + "gate_proj.weight": (inter, h), q + "up_proj.weight": (inter, h),
                              q + "down_proj.weight": (h, inter)})
            s = inter * c["n_shared_experts"]
            layer.update({p + "mlp.shared_experts.gate_proj.weight": (s, h), p + "mlp.shared_experts.up_proj.weight": (s, h),
                          p + "mlp.shared_experts.down_proj.weight": (h, s)})
            out[p + "mlp.gate.weight"] = ((c["n_routed_experts"], h), "F32")
            out[p + "mlp.gate.e_score_correction_bias"] = ((c["n_routed_experts"],), "F32")
        if i >= c["num_hidden_layers"]:  # the MTP layer's own extras
            layer.update({p + "eh_proj.weight": (h, 2 * h), p + "enorm.weight": (h,), p + "hnorm.weight": (h,)})
        out.update({k: (v, "BF16") for k, v in layer.items()})
    return out


def write_header_only(directory: str, shapes: dict, config: dict, num_files: int = 163) -> None:
    """Writes real safetensors headers; each file's data area is a hole (sparse file)."""
    names = list(shapes)
    per = -(-len(names) // num_files)
    weight_map = {}
    for f in range(num_files):
        part = names[f * per:(f + 1) * per]
        fname = f"model-{f + 1:05d}-of-{num_files:05d}.safetensors"
        header, offset = {}, 0
        for n in part:
            shape, dtype = shapes[n]
            size = SIZES[dtype]
            for d in shape:
                size *= d
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[n] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(directory, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4096)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--ep", type=int, default=256)
    ap.add_argument("--fp8", action="store_true", help="the FP8 checkpoint layout (block scales)")
    ap.add_argument("--int4", action="store_true", help="the int4 W4A16 layout (compressed-tensors pack-quantized)")
    ap.add_argument("--dir")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from distload.config import LoadConfig
    from distload.dryrun import dry_run

    directory = args.dir or tempfile.mkdtemp(prefix="distload-ds3-")
    if args.fp8 and args.int4:
        ap.error("--fp8 and --int4 are two layouts; give one")
    layout = "fp8" if args.fp8 else "int4" if args.int4 else None
    quant = {"fp8": FP8_CONFIG, "int4": INT4_CONFIG}.get(layout)
    config = {**CONFIG, "quantization_config": quant} if quant else CONFIG
    shapes = {"fp8": to_fp8, "int4": to_int4}.get(layout, lambda s: s)(tensor_shapes(CONFIG))
    os.makedirs(directory, exist_ok=True)
    existing = os.path.join(directory, "config.json")
    if not os.path.exists(existing):
        write_header_only(directory, shapes, config)
    else:
        with open(existing) as fh:
            if json.load(fh).get("quantization_config") != quant:
                ap.error(f"{directory} holds another layout than {layout or 'bf16'}; give another --dir")
    start = time.perf_counter()
    report = dry_run(directory, LoadConfig(tp=args.tp, ep=args.ep), world_size=args.world)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per = sorted(r.bytes_read for r in report.ranks)
    result = {"benchmark": "dryrun_deepseek_v3" + (f"_{layout}" if layout else ""), "world": args.world, "tp": args.tp, "ep": args.ep,
              "tensors": len(shapes), "units": report.num_units, "complete": report.complete,
              "ignored": len(report.ignored), "unexpected": len(report.unexpected),
              "seconds": round(seconds, 2), "peak_rss_gib": round(peak / 2**30, 3),
              "bytes_per_rank_min": per[0], "bytes_per_rank_median": per[len(per) // 2], "bytes_per_rank_max": per[-1],
              "rank_classes": report.extra.get("planned_rank_classes"),
              "targets": {"seconds": 30, "peak_rss_gib": 2.0},
              "meets_targets": seconds < 30 and peak < 2 * 2**30}
    print(json.dumps(result))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = f"dryrun_deepseek_{layout}.json" if layout else "dryrun_deepseek.json"
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as fh:
        json.dump(result, fh, indent=2)
    return 0 if result["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
