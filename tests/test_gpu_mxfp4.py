"""MXFP4 experts on CUDA: dequantized there too (torch's MXFP4 matmul needs compute capability 10.0),
exactly as on the CPU, and a load onto the GPU equal to the CPU's.

Marked ``gpu``; skipped where CUDA is not available (as in CI).
"""

from __future__ import annotations

import pytest
import torch

import distload
from distload.quant.mxfp4 import dequantize_blocks
from tests.hf_checkpoints import HFSpec, token_ids, write_hf_checkpoint
from tests.mxfp4_checkpoints import write_mxfp4_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEC = HFSpec(model_type="gpt_oss", intermediate_size=96, seed=44, dtype="bfloat16", extra={
    "num_local_experts": 4, "num_experts_per_tok": 2, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2})


def test_dequantization_on_cuda_is_the_cpus_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (3, 40, 5), dtype=torch.uint8, generator=gen)  # 0 (subnormal) .. 254
    cpu = dequantize_blocks(blocks, scales)
    gpu = dequantize_blocks(blocks.cuda(), scales.cuda())
    assert torch.equal(gpu.cpu(), cpu)


def test_an_mxfp4_checkpoint_on_cuda_equals_the_cpu_load(tmp_path):
    q = write_mxfp4_checkpoint(write_hf_checkpoint(str(tmp_path / "bf16"), SPEC), str(tmp_path / "mxfp4"))
    cpu = distload.load(q, distload.LoadConfig(device="cpu", dtype="float32"))
    gpu = distload.load(q, distload.LoadConfig(device="cuda", dtype="float32"))
    assert gpu.report.complete
    cpu_state = cpu.model.state_dict()
    for name, t in gpu.model.state_dict().items():
        assert t.device.type == "cuda" and torch.equal(t.cpu(), cpu_state[name]), name
    ids = token_ids(SPEC)
    with torch.no_grad():
        got, want = gpu.model(ids.cuda()).float().cpu(), cpu.model(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
