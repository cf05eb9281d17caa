"""GPTQ read back by GPT-QModel, an implementation of the format that distload did not write.

Two directions, for each GPTQ scheme of the tests (``tests.gptq_checkpoints.SCHEMES``: 4 and
8 bits, groups of 32 / 64 or one per row, symmetric or not, ``desc_act``, ``checkpoint_format``
``gptq`` and ``gptq_v2``), on a tiny random llama with biased attention:

* **the library writes**: GPT-QModel quantizes the float checkpoint on the CPU (GPTQ with its
  own calibration, packing and zero-point convention) and saves it;
* **the library reads**: the tests' own writer (``tests.gptq_checkpoints``) writes it, and
  GPT-QModel loads it (an asymmetric ``gptq`` one once tagged as its own: see
  ``vouch_for_zero_points``); its dequantization must equal the tests' oracle exactly.

Each checkpoint is then read by GPT-QModel (``TorchLinear``, the pure-torch kernel) and
dequantized by the library's own unpacking, zero points and ``g_idx`` lookup (its ``scales``
upcast to float32 first, so the products are exact instead of rounded to float16); those weights
make a float32 twin checkpoint. distload loads the GPTQ checkpoint at world 1 and at tp 2 and
must give, on every rank, dequantized weights equal to its load of the twin, logits within 1e-5
of transformers' own model on the twin, and logits near the library's own float16 forward.

Needs a Python with gptqmodel (it cannot go into distload's test environment: it pins
numpy 2.2.6 and pulls datasets, pyarrow, pandas and torchao; about 1 minute and 1.6 GB). 7.6.0,
not 7.7.0: that one needs torch >= 2.14.1, and the CPU build here is 2.13.0. From the repository root:

    python3 -m venv /tmp/gptq-venv
    /tmp/gptq-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0   # CPU torch first, no CUDA wheels
    /tmp/gptq-venv/bin/python scripts/gptq_readback.py --json /tmp/gptq-readback.json

It prints one line per (writer, scheme, layout) and exits 1 if any check fails.
``tests/test_gptq_readback.py`` runs it when gptqmodel is importable (or
``DISTLOAD_GPTQ_PYTHON`` names a Python that has it) and skips otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# GPT-QModel's CPU pool gives a model loader 2 workers and refuses a parent pool with fewer;
# its default is half the cores, 1 on a 2-core machine
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tests.hf_checkpoints import HFSpec, hf_logits, read_tensors, write_hf_checkpoint  # noqa: E402

SPEC = HFSpec(model_type="llama", hidden_size=128, intermediate_size=256, head_dim=32, seed=31,
              extra={"attention_bias": True})
"""the model: 4 heads of 32, 2 KV heads, MLP width 256, 2 layers, biases on q/k/v/o"""
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 120], [8, 1, 77, 33, 12, 90, 4]])
LAYOUTS = {"w1": {}, "tp2": {"tp": 2}}
"""distload layouts each checkpoint is loaded at (LoadConfig options)"""
TOLERANCE = 1e-5
"""max |distload - transformers on the library's dequantized twin| / max |transformers|, float32"""
LIBRARY_TOLERANCE = 2e-2
"""the same against GPT-QModel's own forward, which runs in float16"""
LINEARS = 7
"""quantized linears a layer: q, k, v, o, gate, up, down"""
WRITERS = ("gptqmodel", "tests")
"""who wrote each checkpoint: the library, or tests.gptq_checkpoints"""


def write_float_checkpoint(directory: str) -> str:
    """The float32 llama, with a word-level tokenizer of its 128 ids (GPT-QModel loads one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    write_hf_checkpoint(directory, SPEC)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(SPEC.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3").save_pretrained(directory)
    return directory


def library_quantize(src: str, dst: str, scheme: dict) -> str:
    """GPT-QModel quantizes ``src`` on the CPU (16 random sequences of 32 tokens) and saves it to ``dst``."""
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    config = QuantizeConfig(bits=scheme["bits"], group_size=scheme["group_size"] or -1, sym=scheme["sym"],
                            desc_act=scheme.get("desc_act", False),
                            format=FORMAT.GPTQ_V2 if scheme.get("v2") else FORMAT.GPTQ,
                            **({} if scheme["group_size"] else {"act_group_aware": False}))  # (it needs groups)
    model = GPTQModel.load(src, config, device="cpu")
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, SPEC.vocab_size, (32,), generator=g).tolist(),
                    "attention_mask": [1] * 32} for _ in range(16)]
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH)
    model.save(dst)
    return dst


def vouch_for_zero_points(directory: str, scheme: dict) -> None:
    """Tags an asymmetric ``gptq`` (zero minus one) checkpoint as GPT-QModel's own, the one producer
    whose such checkpoints it loads: AutoGPTQ's stored a zero point of 0 as -1, which wraps, so
    GPT-QModel refuses the others. ``tests.gptq_checkpoints`` never writes a zero of 0 there
    (it asserts so); the tag is read by that check alone."""
    import gptqmodel

    if scheme["sym"] or scheme.get("v2"):
        return
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["meta"] = {"quantizer": [f"gptqmodel:{gptqmodel.__version__}"]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def library_read(directory: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPT-QModel's float32 dequantization of each quantized linear (``name.weight`` -> ``[out, in]``)
    and its own float16 logits for ``IDS`` (as float32)."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    model = GPTQModel.load(directory, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = {}
    for name, module in model.model.named_modules():
        if not isinstance(module, TorchLinear):
            continue
        scales = module.scales
        module.scales = scales.float()  # fp16 scale x small integer is exact in float32
        weights[f"{name}.weight"] = module.dequantize_weight().t().float().contiguous()
        module.scales = scales
    with torch.no_grad():
        logits = model.model(IDS).logits.float()
    return weights, logits


def write_twin(src: str, dst: str, weights: dict[str, torch.Tensor]) -> str:
    """A float32 checkpoint of ``src``'s config without its quantization, holding ``weights`` and
    every other tensor of ``src`` but the GPTQ ones (cast to float32: bf16 / fp16 cast exactly)."""
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    config["dtype"] = "float32"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    gptq = ("qweight", "qzeros", "scales", "g_idx")
    tensors = {n: t.float() for n, t in read_tensors(src).items() if n.rpartition(".")[2] not in gptq}
    save_file({**tensors, **weights}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def tests_oracle_diff(directory: str, scheme: dict, weights: dict[str, torch.Tensor]) -> float:
    """Max |library - tests.gptq_checkpoints.dequantize| over the quantized weights (0.0: equal)."""
    from tests.gptq_checkpoints import dequantize

    tensors = read_tensors(directory)
    worst = 0.0
    for name, w in weights.items():
        prefix = name.removesuffix(".weight")
        parts = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        worst = max(worst, (dequantize(parts, bits=scheme["bits"], v2=scheme.get("v2", False)) - w).abs().max().item())
    return worst


def distload_checks(pool, q: str, twin: str, options: dict, ref: torch.Tensor, lib_logits: torch.Tensor,
                    world: int) -> dict:
    """distload on ``q`` against distload on the library's ``twin`` (every rank's dequantized
    weights) and against transformers' logits on the twin; the numbers of one layout."""
    import numpy as np

    from tests import quant_jobs

    opts = {**options, "dtype": "float32"}
    deq = pool.run(world, quant_jobs.load_dequantized, q, opts, raise_errors=True)
    flt = pool.run(world, quant_jobs.load_quantized, twin, opts, raise_errors=True)
    run = pool.run(world, quant_jobs.load_quantized, q, opts, IDS, raise_errors=True)
    matrices, unequal, worst = 0, [], 0.0
    for rank in range(world):
        for name, have in deq[rank].items():
            want = flt[rank]["state"][name]
            matrices += 1
            worst = max(worst, float(np.abs(have - want).max()))
            if have.shape != want.shape or not np.array_equal(have, want):
                unequal.append(f"rank {rank}: {name}")
    logits = torch.from_numpy(run[0]["logits"])
    return {"matrices": matrices, "unequal": unequal, "max_abs_weight_diff": worst,
            "complete": all(r["report"]["complete"] and r["report"]["ok"] for r in run),
            "notes": run[0]["report"]["notes"],
            "logits_rel_err": ((logits - ref).abs().max() / ref.abs().max()).item(),
            "library_logits_rel_err": ((logits - lib_logits).abs().max() / lib_logits.abs().max()).item()}


def verdict(case: dict) -> bool:
    """Whether one case passed: every dequantized weight equal, logits within the tolerances."""
    return (case["library_matrices"] == LINEARS * SPEC.num_hidden_layers and case["matrices"] > 0
            and not case["unequal"] and case["complete"]
            and case["logits_rel_err"] < TOLERANCE and case["library_logits_rel_err"] < LIBRARY_TOLERANCE
            and case.get("tests_oracle_diff", 0.0) == 0.0)


def run(root: str) -> dict:
    """Writes, reads back and loads every (writer, scheme); returns the versions and the cases."""
    import gptqmodel
    import transformers

    from distload.testing import RankPool
    from tests.gptq_checkpoints import SCHEMES, write_gptq_checkpoint

    src = write_float_checkpoint(os.path.join(root, "float"))
    cases = []
    with RankPool(max(o.get("tp", 1) for o in LAYOUTS.values()), device="cpu") as pool:
        for writer in WRITERS:
            for name, scheme in SCHEMES.items():
                q = os.path.join(root, writer, name)
                start = time.perf_counter()
                if writer == "gptqmodel":
                    library_quantize(src, q, scheme)
                else:
                    vouch_for_zero_points(write_gptq_checkpoint(src, q, **scheme), scheme)
                weights, lib_logits = library_read(q)
                twin = write_twin(q, os.path.join(root, writer, name + "-twin"), weights)
                ref = hf_logits(twin, IDS)
                extra = {"tests_oracle_diff": tests_oracle_diff(q, scheme, weights)} if writer == "tests" else {}
                with open(os.path.join(q, "config.json")) as f:
                    written = json.load(f)["quantization_config"]
                for layout, options in LAYOUTS.items():
                    case = {"writer": writer, "scheme": name, "layout": layout,
                            "checkpoint_format": written.get("checkpoint_format", "gptq"),
                            "library_matrices": len(weights), **extra,
                            **distload_checks(pool, q, twin, options, ref, lib_logits, options.get("tp", 1))}
                    case["ok"] = verdict(case)
                    cases.append(case)
                    print(f"{'ok  ' if case['ok'] else 'FAIL'} {writer:9} {name:22} {layout:4} "
                          f"{case['checkpoint_format']:7} weights equal {case['matrices'] - len(case['unequal'])}/"
                          f"{case['matrices']}, logits vs transformers {case['logits_rel_err']:.1e}, vs library fp16 "
                          f"{case['library_logits_rel_err']:.1e}" + (f", tests oracle diff {extra['tests_oracle_diff']}"
                                                                     if extra else "")
                          + f" ({time.perf_counter() - start:.1f} s)", flush=True)
    return {"versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the versions and every case's numbers here")
    parser.add_argument("--keep", help="write the checkpoints under this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as root:
        result = run(root)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    failed = [c for c in result["cases"] if not c["ok"]]
    print(f"gptq readback: {len(result['cases']) - len(failed)} of {len(result['cases'])} cases agree", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
