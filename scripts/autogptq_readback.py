"""GPTQ checkpoints of ``scripts/gptq_readback.py --keep DIR`` read back by AutoGPTQ 0.7.1, the
format's original implementation.

AutoGPTQ cannot quantize without CUDA and predates ``gptq_v2`` (it reads every checkpoint as
``gptq``, zero points stored minus one), so it only reads: each ``gptq`` checkpoint under DIR,
written by GPT-QModel or by ``tests.gptq_checkpoints``. Its own ``QuantLinear`` (the pure-torch
path it takes when its CUDA extension does not load) gives each linear's weights: the layer
applied to the identity, with ``scales`` upcast to float32 and the bias left out, so exactly
``scales * (q - zero)``. They must equal the twin checkpoint beside it (GPT-QModel's
dequantization, which distload's every rank matched exactly) and, for the tests' writer, the
tests' oracle. A ``gptq_v2`` checkpoint is listed as not read, with why.

AutoGPTQ 0.7.1 imports only beside the transformers of its time (5.x removed
``no_init_weights``); from the repository root:

    python3 -m venv /tmp/autogptq-venv
    /tmp/autogptq-venv/bin/pip install torch==2.13.0 auto-gptq==0.7.1 transformers==4.38.2 peft==0.9.0 \\
        datasets==2.18.0
    /tmp/gptq-venv/bin/python scripts/gptq_readback.py --keep /tmp/gptq-ckpts
    /tmp/autogptq-venv/bin/python scripts/autogptq_readback.py /tmp/gptq-ckpts --json /tmp/autogptq.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gptq_readback import WRITERS, tests_oracle_diff  # noqa: E402 (also puts the repository on sys.path)

import torch  # noqa: E402

from tests.hf_checkpoints import read_tensors  # noqa: E402


def autogptq_read(directory: str) -> dict[str, torch.Tensor]:
    """AutoGPTQ's float32 weights of each quantized linear (``name.weight`` -> ``[out, in]``)."""
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    with open(os.path.join(directory, "config.json")) as f:
        stored = json.load(f)["quantization_config"]
    # given explicitly: for a local directory 0.7.1 looks for quantize_config.json only
    known = {f.name for f in dataclasses.fields(BaseQuantizeConfig)}
    config = BaseQuantizeConfig(**{k: v for k, v in stored.items() if k in known})
    model = AutoGPTQForCausalLM.from_quantized(directory, quantize_config=config, device="cpu", use_safetensors=True,
                                               use_triton=False, disable_exllama=True, disable_exllamav2=True)
    weights = {}
    for name, module in model.model.named_modules():
        if not hasattr(module, "qweight"):
            continue
        scales, bias = module.scales, module.bias
        module.scales, module.bias = scales.float(), None  # fp16 scale x small integer is exact in float32
        with torch.no_grad():
            weights[f"{name}.weight"] = module(torch.eye(module.infeatures)).t().contiguous()
        module.scales, module.bias = scales, bias
    return weights


def run(root: str) -> dict:
    """Reads every ``gptq`` checkpoint under ``root``; returns the versions, the cases and what was not read."""
    import auto_gptq
    import transformers

    from tests.gptq_checkpoints import SCHEMES

    cases, not_read = [], []
    for writer in WRITERS:
        for name, scheme in SCHEMES.items():
            q = os.path.join(root, writer, name)
            if scheme.get("v2"):
                not_read.append({"writer": writer, "scheme": name, "reason": "gptq_v2: AutoGPTQ 0.7.1 reads every "
                                 "checkpoint as gptq (zero points stored minus one)"})
                continue
            weights = autogptq_read(q)
            twin = read_tensors(q + "-twin")
            diff = max((w - twin[n]).abs().max().item() for n, w in weights.items())
            case = {"writer": writer, "scheme": name, "library_matrices": len(weights), "gptqmodel_diff": diff}
            if writer == "tests":
                case["tests_oracle_diff"] = tests_oracle_diff(q, scheme, weights)
            case["ok"] = len(weights) > 0 and diff == 0.0 and case.get("tests_oracle_diff", 0.0) == 0.0
            cases.append(case)
            print(f"{'ok  ' if case['ok'] else 'FAIL'} {writer:9} {name:22} {len(weights)} linears, max |AutoGPTQ - "
                  f"GPT-QModel| {diff}" + (f", tests oracle diff {case['tests_oracle_diff']}" if writer == "tests"
                                           else ""), flush=True)
    return {"versions": {"auto_gptq": auto_gptq.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}, "cases": cases, "not_read": not_read}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the --keep directory of a scripts/gptq_readback.py run")
    parser.add_argument("--json", help="write the versions and every case's numbers here")
    args = parser.parse_args(argv)
    result = run(args.root)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    failed = [c for c in result["cases"] if not c["ok"]]
    print(f"autogptq readback: {len(result['cases']) - len(failed)} of {len(result['cases'])} cases agree, "
          f"{len(result['not_read'])} not read", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
