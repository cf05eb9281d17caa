"""FP8 on CUDA: a real FP8 matmul (``torch._scaled_mm``) where the device has one, dequantization
otherwise, and loads of FP8 checkpoints onto the GPU equal to loads on the CPU.

Marked ``gpu``; skipped where CUDA is not available (as in CI).

Metric for the real FP8 matmul: it quantizes activations too (per token, e4m3: 3 mantissa
bits, a rounding error up to 2^-4 of each value) and accumulates into bf16, so it cannot
match a float32 reference to 1e-5. One layer's output is compared with the dequantized
float32 matmul at max|diff| / max|ref| < 0.05 (measured 0.024 with float32 and 0.030 with
bf16 inputs on an H100); whole-model logits at < 0.25 (measured 0.15): tiny random models
amplify per-layer noise over their layers, as much as FP8 rounding of the weights alone
moves them from the unquantized model's logits (0.16 for the same model).
"""

from __future__ import annotations

import pytest
import torch

import distload
from distload.quant import fp8 as fp8_module
from tests.fp8_checkpoints import write_block_fp8_checkpoint
from tests.hf_checkpoints import HFSpec, write_hf_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LLAMA = HFSpec(model_type="llama", intermediate_size=128, seed=7)
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 120, 44, 8, 1, 77, 33, 12, 90, 4, 11]])


def _has_fp8_matmul() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref.float().cpu()).abs().max() / ref.float().cpu().abs().max()).item()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-quant")
    f32 = write_hf_checkpoint(str(root / "f32"), LLAMA)
    return {"f32": f32, "fp8": write_block_fp8_checkpoint(f32, str(root / "fp8"))}


@pytest.mark.skipif(not _has_fp8_matmul(), reason="needs compute capability 8.9+ for FP8 matmuls")
def test_one_layer_fp8_matmul_is_close_to_the_dequantized_matmul():
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda") * 0.05
    q, scale = fp8_module.quantize_rows(w)
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    got = fp8_module.fp8_linear(x, q, scale[:, 0], None, None)
    ref = x.float() @ (q.float() * scale).t()
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < 0.05


@pytest.mark.skipif(not _has_fp8_matmul(), reason="needs compute capability 8.9+ for FP8 matmuls")
def test_online_fp8_on_cuda_runs_real_fp8_matmuls(llama, monkeypatch):
    assert fp8_module._path_works("row", torch.device("cuda", 0))  # probed before counting calls
    calls = []
    real = fp8_module.fp8_linear
    monkeypatch.setattr(fp8_module, "fp8_linear", lambda *a: calls.append(1) or real(*a))
    ref = distload.load(llama["f32"], distload.LoadConfig(device="cpu", dtype="float32", quantize="fp8"))
    gpu = distload.load(llama["f32"], distload.LoadConfig(device="cuda", dtype="float32", quantize="fp8"))
    assert gpu.report.complete
    weight = gpu.model.model.layers["0"].self_attn.qkv_proj.weight
    assert weight.device.type == "cuda" and weight.dtype == torch.float8_e4m3fn
    cpu_weight = ref.model.model.layers["0"].self_attn.qkv_proj.weight
    assert torch.equal(weight.cpu().view(torch.uint8), cpu_weight.view(torch.uint8))
    with torch.no_grad():
        want = ref.model(IDS)
        got = gpu.model(IDS.cuda())
    assert len(calls) == 2 * 4  # every linear of both layers: qkv, o, gate_up, down
    assert _rel(got, want) < 0.25


def test_block_fp8_checkpoint_on_cuda_equals_the_cpu_load(llama):
    cpu = distload.load(llama["fp8"], distload.LoadConfig(device="cpu", dtype="float32"))
    gpu = distload.load(llama["fp8"], distload.LoadConfig(device="cuda", dtype="float32"))
    assert gpu.report.complete
    cpu_state = cpu.model.state_dict()
    for name, t in gpu.model.state_dict().items():
        assert t.device.type == "cuda", name
        want = cpu_state[name]
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(t.cpu().view(torch.uint8), want.view(torch.uint8)), name
        else:
            assert torch.equal(t.cpu(), want), name
    with torch.no_grad():  # block scales: dequantized in float32 on the GPU as well
        assert _rel(gpu.model(IDS.cuda()), cpu.model(IDS)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="DeepSeek-style block FP8 matmuls run on Hopper (compute capability 9.0)")
def test_block_128_checkpoint_on_hopper_runs_block_scaled_fp8_matmuls(tmp_path, monkeypatch):
    """Blocks of 128 x 128 that every local weight holds whole: torch's block-scaled FP8 matmul
    (activations quantized per token and 128 columns), within the same bound as row scales."""
    # every K (hidden 512, intermediate 1024) a multiple of 512: see SerializedFP8.block_scales
    spec = HFSpec(model_type="llama", hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=128, seed=9)
    f32 = write_hf_checkpoint(str(tmp_path / "f32"), spec)
    fp8 = write_block_fp8_checkpoint(f32, str(tmp_path / "fp8"), block=(128, 128))
    assert fp8_module._path_works("block", torch.device("cuda", 0))  # probed before counting calls
    calls = []
    real = fp8_module.fp8_block_linear
    monkeypatch.setattr(fp8_module, "fp8_block_linear", lambda *a: calls.append(1) or real(*a))
    cpu = distload.load(fp8, distload.LoadConfig(device="cpu", dtype="float32"))
    unquantized = distload.load(f32, distload.LoadConfig(device="cpu", dtype="float32"))
    gpu = distload.load(fp8, distload.LoadConfig(device="cuda", dtype="bfloat16"))
    with torch.no_grad():
        want, got, plain = cpu.model(IDS), gpu.model(IDS.cuda()), unquantized.model(IDS)
    assert len(calls) == 2 * 4
    # quantizing activations may cost this random model at most twice what quantizing its
    # weights did (measured on an H100: 0.17 against 0.27)
    assert _rel(got, want) < 2 * _rel(want, plain)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="DeepSeek-style block FP8 matmuls run on Hopper (compute capability 9.0)")
@pytest.mark.parametrize("m, k, n", [(7, 512, 384), (3, 1024, 384), (1, 2048, 128), (14, 512, 256)])
def test_one_block_scaled_fp8_matmul_is_close_to_the_dequantized_matmul(m, k, n):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.05
    blocks = w.view(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (q.float().view(n // 128, 128, k // 128, 128) * scale[:, None, :, None]).view(n, k).t()
    assert _rel(fp8_module.fp8_block_linear(x, q, scale, None), ref) < 0.05  # measured 0.024-0.031
