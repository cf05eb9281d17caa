"""The block-wise FP8 checkpoint writer of ``tests.fp8_checkpoints``, checked against the format
(raw safetensors headers, names, dtypes, scale grids, config) and by arithmetic written here:
per-block loops for quantizing and dequantizing, FP8 error bounds, partial blocks. transformers
loads the dequantized reference; where accelerate is importable it also reads the FP8 checkpoint
itself and must agree with the reference exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch

from tests.fp8_checkpoints import (
    FP8_DTYPE,
    dequantize_block,
    is_quantized,
    quantize_block,
    write_block_fp8_checkpoint,
    write_dequantized_checkpoint,
)
from tests.hf_checkpoints import DEEPSEEK_V3, INDEX, QWEN3_MOE, HFSpec, hf_config, hf_logits, read_tensors, \
    write_hf_checkpoint

pytest.importorskip("transformers")

BLOCK = (16, 16)

SPECS = {
    # intermediate_size 40: gate/up [40, 64] and down [64, 40] end in a partial block of 8
    "llama": HFSpec(model_type="llama", intermediate_size=40, seed=31),
    # the same specs as tests/test_hf_moe.py and tests/test_hf_deepseek.py (copied, so that this
    # file does not import distload)
    "mixtral": HFSpec(model_type="mixtral", intermediate_size=32, seed=11,
                      extra={"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 5}),
    "qwen3_moe": QWEN3_MOE,
    # kv_a_proj_with_mqa [12, 32] (kv_lora_rank 8 + qk_rope 4) and kv_b_proj [64, 8]: one partial block
    "deepseek_v3": DEEPSEEK_V3,
}
MODELS = list(SPECS)

N_QUANTIZED = {
    "llama": 2 * 7,                          # q k v o gate up down
    "mixtral": 2 * (4 + 8 * 3),              # attention + 8 experts x w1 w2 w3
    "qwen3_moe": 3 * 4 + 2 * 8 * 3 + 3,      # attention; layers 0, 2: 8 experts; layer 1 dense
    "deepseek_v3": 3 * 5 + 3 + 2 * (8 * 3 + 3),  # MLA q_a q_b kv_a kv_b o; dense layer 0; experts + shared
}
NOT_CONVERTED = {
    "llama": ["lm_head"],
    "mixtral": ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"],
    "qwen3_moe": ["lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"],
    "deepseek_v3": ["lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"],
}


class Ckpt:
    def __init__(self, root: str, spec: HFSpec) -> None:
        self.f32 = write_hf_checkpoint(os.path.join(root, "f32"), spec)
        self.fp8 = write_block_fp8_checkpoint(self.f32, os.path.join(root, "fp8"), block=BLOCK)
        self.deq = write_dequantized_checkpoint(self.fp8, os.path.join(root, "deq"))
        self.orig = read_tensors(self.f32)
        self.tensors = read_tensors(self.fp8)
        self.quantized = sorted(n for n, t in self.orig.items() if is_quantized(n, t.shape))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache: dict[str, Ckpt] = {}

    def get(model: str) -> Ckpt:
        if model not in cache:
            cache[model] = Ckpt(str(tmp_path_factory.mktemp(model)), SPECS[model])
        return cache[model]

    return get


def headers(directory: str) -> dict[str, tuple[str, str, list[int]]]:
    """name -> (file, dtype, shape), parsed from the raw safetensors headers."""
    out = {}
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".safetensors"):
            continue
        with open(os.path.join(directory, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        assert header.pop("__metadata__") == {"format": "pt"}
        end = 0
        for name, h in header.items():
            assert name not in out
            out[name] = (fname, h["dtype"], h["shape"])
            start, stop = h["data_offsets"]
            elem = 1 if h["dtype"] == "F8_E4M3" else 4
            assert stop - start == elem * math.prod(h["shape"]), name
            end = max(end, stop)
        assert 8 + n + end == size, fname
    return out


def blocks(shape, block=BLOCK):
    """(i, j, rows, cols) of every block, the last along a dimension possibly partial."""
    for i in range(math.ceil(shape[0] / block[0])):
        for j in range(math.ceil(shape[1] / block[1])):
            yield i, j, slice(i * block[0], min((i + 1) * block[0], shape[0])), \
                slice(j * block[1], min((j + 1) * block[1], shape[1]))


def loop_quantize(w: torch.Tensor, block=BLOCK):
    q = torch.empty(w.shape, dtype=FP8_DTYPE)
    s = torch.empty(math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
    for i, j, r, c in blocks(w.shape, block):
        amax = w[r, c].abs().max()
        scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
        s[i, j] = scale
        q[r, c] = (w[r, c] / scale).clamp(-448.0, 448.0).to(FP8_DTYPE)
    return q, s


def loop_dequantize(q: torch.Tensor, s: torch.Tensor, block=BLOCK) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i, j, r, c in blocks(q.shape, block):
        out[r, c] = q[r, c].float() * s[i, j]
    return out


def scale_of(name: str) -> str:
    return name.removesuffix(".weight") + ".weight_scale_inv"


# ---------------------------------------------------------------- the rule


def test_is_quantized_rule():
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
           "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.block_sparse_moe.experts.2.w3.weight",
           "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.mlp.shared_expert.gate_proj.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
          "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
          "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.3.eh_proj.weight",
          "model.layers.3.shared_head.head.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]
    assert all(is_quantized(n, (32, 32)) for n in yes)
    assert not any(is_quantized(n, (32, 32)) for n in no)
    assert not is_quantized("model.layers.0.self_attn.q_proj.bias", (32,))
    assert not is_quantized("model.layers.0.self_attn.q_proj.weight", (32,))


@pytest.mark.parametrize("model", MODELS)
def test_quantized_set(ckpts, model):
    """The rule picks the expected number of weights, and everything left is an embedding, the
    head, a router or 1-D."""
    c = ckpts(model)
    assert len(c.quantized) == N_QUANTIZED[model]
    for name, t in c.orig.items():
        assert t.ndim <= 2
        if name not in c.quantized and t.ndim == 2:
            assert name in ("model.embed_tokens.weight", "lm_head.weight") or name.endswith(".gate.weight"), name


# ---------------------------------------------------------------- names, files, dtypes, config


@pytest.mark.parametrize("model", MODELS)
def test_names_files_and_index(ckpts, model):
    c = ckpts(model)
    src, dst = headers(c.f32), headers(c.fp8)
    assert set(dst) == set(src) | {scale_of(n) for n in c.quantized}
    assert {f for f, _, _ in dst.values()} == {f for f, _, _ in src.values()}
    for name in src:
        assert dst[name][0] == src[name][0], name  # every tensor stays in its shard
    for name in c.quantized:
        assert dst[scale_of(name)][0] == dst[name][0], name  # the scale sits with its weight
    with open(os.path.join(c.fp8, INDEX)) as f:
        index = json.load(f)
    assert index["weight_map"] == {n: f for n, (f, _, _) in dst.items()}
    nbytes = sum(t.numel() * t.element_size() for t in c.tensors.values())
    assert index["metadata"]["total_size"] == nbytes
    assert sorted(os.listdir(c.fp8)) == sorted(os.listdir(c.f32))


@pytest.mark.parametrize("model", MODELS)
def test_dtypes_and_scale_shapes(ckpts, model):
    c = ckpts(model)
    src, dst = headers(c.f32), headers(c.fp8)
    for name, (_, dtype, shape) in src.items():
        assert dtype == "F32"
        if name in c.quantized:
            assert dst[name][1:] == ("F8_E4M3", shape), name
            out, inp = shape
            assert dst[scale_of(name)][1:] == ("F32", [-(-out // 16), -(-inp // 16)]), name
        else:
            assert dst[name][1:] == ("F32", shape), name
            assert torch.equal(c.tensors[name], c.orig[name]), name
    assert all(c.tensors[n].dtype == FP8_DTYPE for n in c.quantized)


@pytest.mark.parametrize("model", MODELS)
def test_config(ckpts, model):
    from transformers import FineGrainedFP8Config

    c = ckpts(model)
    with open(os.path.join(c.f32, "config.json")) as f:
        src = json.load(f)
    with open(os.path.join(c.fp8, "config.json")) as f:
        dst = json.load(f)
    qc = dst.pop("quantization_config")
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [16, 16], "modules_to_not_convert": NOT_CONVERTED[model]}
    assert dst == src and dst["dtype"] == "float32"
    parsed = FineGrainedFP8Config.from_dict(qc)
    assert list(parsed.weight_block_size) == [16, 16] and parsed.modules_to_not_convert == NOT_CONVERTED[model]
    with open(os.path.join(c.deq, "config.json")) as f:
        assert json.load(f) == src


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("model", MODELS)
def test_quantize_and_dequantize_match_loops(ckpts, model):
    """The FP8 bytes and scales equal a per-block loop; dequantize_block equals a per-block loop."""
    c = ckpts(model)
    for name in c.quantized:
        q, s = c.tensors[name], c.tensors[scale_of(name)]
        lq, ls = loop_quantize(c.orig[name])
        assert torch.equal(q.view(torch.uint8), lq.view(torch.uint8)), name
        assert torch.equal(s, ls), name
        assert torch.equal(dequantize_block(q, s, BLOCK), loop_dequantize(q, s)), name


@pytest.mark.parametrize("model", MODELS)
def test_dequantized_close_to_original(ckpts, model):
    c = ckpts(model)
    deq = read_tensors(c.deq)
    assert set(deq) == set(c.orig)
    for name, w in c.orig.items():
        d = deq[name]
        assert d.dtype == torch.float32 and d.shape == w.shape
        if name not in c.quantized:
            assert torch.equal(d, w), name
            continue
        s = c.tensors[scale_of(name)]
        assert torch.equal(d, dequantize_block(c.tensors[name], s, BLOCK))
        for i, j, r, cc in blocks(w.shape):
            amax = w[r, cc].abs().max()
            err = (d[r, cc] - w[r, cc]).abs()
            assert err.max() < 0.07 * amax, (name, i, j)
            # e4m3: 3 mantissa bits (half an ulp <= 2^-4 of the value), subnormal step 2^-9
            assert (err <= w[r, cc].abs() / 16 + s[i, j] / 1024 + 1e-6 * amax).all(), (name, i, j)
            # the largest element maps to +-448 and back
            k = w[r, cc].abs().argmax()
            assert c.tensors[name][r, cc].float().abs().flatten()[k] == 448.0
            assert torch.isclose(d[r, cc].flatten()[k], w[r, cc].flatten()[k], rtol=1e-6, atol=0), (name, i, j)


def test_partial_blocks(ckpts):
    """40 = 16 + 16 + 8 rows (gate/up) and columns (down); DeepSeek's 12-row kv_a_proj_with_mqa and
    8-column kv_b_proj are one partial block each. A partial block's scale comes from its own
    elements only, and it dequantizes within FP8 error."""
    cases = {"llama": {"model.layers.0.mlp.gate_proj.weight": (3, 4), "model.layers.1.mlp.up_proj.weight": (3, 4),
                       "model.layers.0.mlp.down_proj.weight": (4, 3)},
             "deepseek_v3": {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (1, 2),
                             "model.layers.2.self_attn.kv_b_proj.weight": (4, 1)}}
    for model, names in cases.items():
        c = ckpts(model)
        for name, grid in names.items():
            w, q, s = c.orig[name], c.tensors[name], c.tensors[scale_of(name)]
            assert tuple(s.shape) == grid
            out, inp = w.shape
            assert out % 16 or inp % 16
            d = dequantize_block(q, s, BLOCK)
            r0, c0 = (grid[0] - 1) * 16, (grid[1] - 1) * 16
            corner = w[r0:, c0:]  # the last block, partial along at least one dimension
            assert corner.shape[0] < 16 or corner.shape[1] < 16
            assert s[-1, -1] == corner.abs().max() / 448.0
            assert (d[r0:, c0:] - corner).abs().max() < 0.07 * corner.abs().max()
            assert q[r0:, c0:].float().abs().max() == 448.0


def test_quantize_block_edges():
    """An all-zero block gets scale 1 and zeros; a block shape other than square keeps
    [rows along out, columns along in]; a wrong scale grid is refused."""
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    w[16:32, 16:24] = 0
    q, s = quantize_block(w, (16, 16))
    assert s.shape == (3, 2) and s[1, 1] == 1.0 and (q[16:32, 16:24].float() == 0).all()
    assert torch.equal(dequantize_block(q, s, (16, 16))[16:32, 16:24], torch.zeros(16, 8))
    for block in [(8, 32), (16, 16), (5, 7)]:
        q, s = quantize_block(w, block)
        lq, ls = loop_quantize(w, block)
        assert torch.equal(q.view(torch.uint8), lq.view(torch.uint8)) and torch.equal(s, ls)
        assert torch.equal(dequantize_block(q, s, block), loop_dequantize(q, s, block))
    with pytest.raises(AssertionError):
        dequantize_block(q, s, (16, 16))


# ---------------------------------------------------------------- transformers


@pytest.mark.parametrize("model", MODELS)
def test_transformers_loads_dequantized(ckpts, model):
    from transformers import AutoModelForCausalLM

    c = ckpts(model)
    m, info = AutoModelForCausalLM.from_pretrained(c.deq, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert getattr(m.config, "quantization_config", None) is None
    deq = read_tensors(c.deq)
    state = m.state_dict()
    direct = [n for n in c.quantized if n in state]  # expert weights are fused by transformers
    assert direct
    for name in direct:
        assert torch.equal(state[name], deq[name]), name
    ids = torch.randint(0, SPECS[model].vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, ref = hf_logits(c.deq, ids), hf_logits(c.f32, ids)
    assert torch.isfinite(logits).all() and not torch.equal(logits, ref)


@pytest.mark.parametrize("model", MODELS)
def test_transformers_fp8_modules(ckpts, model):
    """transformers' FP8 module swap under our quantization_config (meta device, no weights):
    its FP8Linear modules are exactly our quantized non-expert linears, with our scale grids
    (transformers sizes them ceil(out/bn) x ceil(in/bk)), and every MoE layer's experts are FP8."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear, replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    c = ckpts(model)
    with open(os.path.join(c.fp8, "config.json")) as f:
        qc = FineGrainedFP8Config.from_dict(json.load(f)["quantization_config"])
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config(SPECS[model]), dtype=torch.float32)
    skip = HfQuantizer.get_modules_to_not_convert(m, qc.modules_to_not_convert, m._keep_in_fp32_modules)
    replace_with_fp8_linear(m, modules_to_not_convert=skip, quantization_config=qc, pre_quantized=True)
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, FP8Linear)}
    experts = {n for n, mod in m.named_modules() if isinstance(mod, FP8Experts)}
    assert {n + ".weight" for n in linears} == {n for n in c.quantized if ".experts." not in n}
    for n, mod in linears.items():
        assert mod.weight_scale_inv.shape == c.tensors[n + ".weight_scale_inv"].shape, n
    assert len(experts) == len({n.split(".experts.")[0] for n in c.quantized if ".experts." in n})


@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_transformers_reads_fp8_checkpoint(ckpts, model):
    """transformers reads the FP8 checkpoint itself (on CPU it dequantizes while loading) and gets
    the reference's logits exactly. Not the llama spec: transformers' CPU dequantization derives
    the block from the scale grid and refuses a partial block after whole ones (40 rows, 3 scales);
    its FP8Linear (GPU) and vLLM size the grid with ceil and accept it."""
    pytest.importorskip("accelerate")  # transformers' FP8 quantizer requires it
    if torch.cuda.is_available():  # with a GPU present it wants its FP8 kernels package instead
        pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM

    c = ckpts(model)
    m, info = AutoModelForCausalLM.from_pretrained(c.fp8, dtype=torch.float32, attn_implementation="eager",
                                                   output_loading_info=True)
    assert not any(info.values()), info
    m.eval()
    ids = torch.randint(0, SPECS[model].vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(ids).logits.float()
    assert torch.equal(logits, hf_logits(c.deq, ids))
