"""The FP8 compressed-tensors checkpoints of ``tests.ct_checkpoints`` are what they claim to be.

distload's FP8 tests take these checkpoints as real and their dequantized copies as the
reference, so both are checked here against things that do not share their code: the float32
weights they were made from, the compressed-tensors library's own decompression, and
transformers' loader of compressed-tensors checkpoints.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.ct_checkpoints import _unfuse_experts, dequantized_checkpoint, write_ct_checkpoint
from tests.hf_checkpoints import INDEX, HFSpec, read_tensors, write_hf_checkpoint

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SPECS = {
    "llama": HFSpec(model_type="llama"),
    # as in test_hf_moe: q/k norms, renormalized top-k, layer 1 a dense MLP
    "qwen3_moe": HFSpec(model_type="qwen3_moe", num_hidden_layers=3, seed=13,
                        extra={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "norm_topk_prob": True, "mlp_only_layers": [1]}),
    # as in test_hf_moe: checkpoint names (block_sparse_moe, w1/w2/w3) that differ from the model's
    "mixtral": HFSpec(model_type="mixtral", intermediate_size=32, seed=11,
                      extra={"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 5}),
    # as in test_hf_moe: a shared expert (quantized) and its one-output gate (not)
    "qwen2_moe": HFSpec(model_type="qwen2_moe", seed=12,
                        extra={"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
}

IGNORE = {"llama": ["lm_head"], "qwen3_moe": ["lm_head", "re:.*mlp.gate$"],
          "mixtral": ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"],
          "qwen2_moe": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]}

VARIANTS = {
    # strategy -> options; between them every option is on and off at least once
    "tensor": dict(kv_cache=True),
    "channel": dict(static_input=True, kv_cache=True),
    "block": dict(block=(16, 16)),
    # partial last blocks: 48 rows (of 64 and 32), 40 columns (of 64, 96 and 32)
    "block_partial": dict(block=(48, 40), static_input=True),
}

CASES = [(m, v) for m in ("llama", "qwen3_moe") for v in VARIANTS] + [("mixtral", "channel"), ("qwen2_moe", "channel")]

FP8_RELATIVE = 0.07
"""max |dequantized - float| / max |float| per tensor: e4m3 rounds to 3 mantissa bits (1/16 of a value at most)"""

LOGITS_RELATIVE = 0.5
"""max |logits(dequantized) - logits(float)| / max |logits(float)|. Loose: these random models amplify
weight noise (1% multiplicative noise moves llama's logits by 5%; e4m3 rounding, up to 6%, by 12-40%,
MoE routing flips included); a tensor loaded into the wrong place moves them by more than 100%"""


class Checkpoints:
    """Writes each checkpoint on first use, once per session."""

    def __init__(self, root) -> None:
        self.root = root
        self._dirs: dict[str, str] = {}

    def _once(self, name: str, write) -> str:
        if name not in self._dirs:
            self._dirs[name] = write(str(self.root / name))
        return self._dirs[name]

    def float(self, model: str) -> str:
        return self._once(f"{model}-float", lambda d: write_hf_checkpoint(d, SPECS[model]))

    def ct(self, model: str, variant: str) -> str:
        options = dict(VARIANTS[variant])
        strategy = variant.split("_")[0]
        return self._once(f"{model}-{variant}", lambda d: write_ct_checkpoint(d, SPECS[model], strategy=strategy,
                                                                             **options))

    def dequantized(self, model: str, variant: str) -> str:
        return self._once(f"{model}-{variant}-deq", lambda d: dequantized_checkpoint(self.ct(model, variant), d))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("ct"))


def _config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _quantized(name: str, t: torch.Tensor) -> bool:
    """Which float tensors the recipe quantizes: decoder-layer matrices but the MoE router and shared-expert gate."""
    return name.startswith("model.layers.") and t.dim() == 2 and not name.endswith(
        ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight"))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _load(directory: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager", **kwargs)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("model", SPECS)
def test_unfused_experts_compute_the_same(ckpts, model):
    """The per-expert linears that stand in for transformers' fused experts change no logit."""
    m = _load(ckpts.float(model))
    before = _logits(m, IDS)
    _unfuse_experts(m, SPECS[model].model_type)
    torch.testing.assert_close(_logits(m, IDS), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model,variant", CASES)
def test_checkpoint_layout(ckpts, model, variant):
    """F8_E4M3 weights with scales of the strategy's shape beside them, float32 everything else,
    several shards and an index, and the library's quantization_config in config.json."""
    options = VARIANTS[variant]
    strategy, static, kv = variant.split("_")[0], options.get("static_input", False), options.get("kv_cache", False)
    directory = ckpts.ct(model, variant)
    q = _config(directory)["quantization_config"]
    assert (q["quant_method"], q["format"], q["quantization_status"]) == ("compressed-tensors", "float-quantized",
                                                                         "compressed")
    (group,) = q["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["symmetric"], w["dynamic"], w["strategy"]) == ("float", 8, True, False,
                                                                                       strategy)
    assert w.get("block_structure") == (list(options["block"]) if strategy == "block" else None)
    assert (a["type"], a["num_bits"], a["dynamic"], a["strategy"]) == (("float", 8, False, "tensor") if static
                                                                      else ("float", 8, True, "token"))
    assert group["targets"] == ["Linear"]
    assert q["ignore"] == IGNORE[model]
    assert (q["kv_cache_scheme"] is not None) == kv

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    with open(os.path.join(directory, INDEX)) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == files and len(files) > 2

    original = read_tensors(ckpts.float(model))
    tensors = read_tensors(directory)
    quantized = sorted(n for n, t in original.items() if _quantized(n, t))
    attentions = sorted({n.rsplit(".", 2)[0] for n in quantized if ".self_attn." in n})
    expected = set(original) | {n + "_scale" for n in quantized}
    expected |= {n.removesuffix("weight") + "input_scale" for n in quantized} if static else set()
    expected |= {f"{a}.{kv}_scale" for a in attentions for kv in "kv"} if kv else set()
    assert set(tensors) == expected
    assert any(".experts." in n for n in quantized) == (model != "llama")

    for name in quantized:
        weight, scale = tensors[name], tensors[name + "_scale"]
        assert weight.dtype == torch.float8_e4m3fn and weight.shape == original[name].shape
        rows, cols = weight.shape
        if strategy == "tensor":
            assert scale.shape == (1,)
        elif strategy == "channel":
            assert scale.shape == (rows, 1)
        else:
            bn, bk = options["block"]
            assert scale.shape == (-(-rows // bn), -(-cols // bk))
    for name, t in tensors.items():
        if name not in quantized:
            assert t.dtype == torch.float32, name
        if name.endswith(("_scale")):
            assert torch.isfinite(t).all() and (t > 0).all(), name
        if name.endswith(("input_scale", "k_scale", "v_scale")):
            assert t.shape == (1,), name
    for name in set(original) - set(quantized):
        assert torch.equal(tensors[name], original[name]), name


@pytest.mark.parametrize("model,variant", CASES)
def test_dequantized_checkpoint(ckpts, model, variant):
    """The dequantized weights are the float ones up to e4m3 rounding, equal the library's own
    decompression, and transformers loads them into a model whose logits stay near the float model's
    (a sanity check; test_transformers_reads_the_checkpoint pins the weights transformers loads)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = ckpts.ct(model, variant)
    dst = ckpts.dequantized(model, variant)
    assert "quantization_config" not in _config(dst)
    original, packed, dequantized = read_tensors(ckpts.float(model)), read_tensors(src), read_tensors(dst)
    assert set(dequantized) == set(original)
    for name, t in dequantized.items():
        assert t.dtype == torch.float32 and t.shape == original[name].shape, name
        if _quantized(name, original[name]):
            error = (t - original[name]).abs().max() / original[name].abs().max()
            assert 0 < error < FP8_RELATIVE, (name, error)
        else:
            assert torch.equal(t, original[name]), name

    q = QuantizationConfig.model_validate(_config(src)["quantization_config"])
    (scheme,) = q.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    for name in (n for n in packed if n.endswith(".weight_scale")):
        weight = name.removesuffix("_scale")
        library = compressor.decompress({"weight": packed[weight], "weight_scale": packed[name]}, scheme)["weight"]
        assert torch.equal(library, dequantized[weight]), weight

    reference = _logits(_load(ckpts.float(model)), IDS)
    error = (_logits(_load(dst), IDS) - reference).abs().max() / reference.abs().max()
    assert error < LOGITS_RELATIVE, error


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("model,variant", CASES)
def test_transformers_reads_the_checkpoint(ckpts, model, variant):
    """transformers' own compressed-tensors loader, dequantizing, gets exactly the dequantized weights."""
    from transformers import CompressedTensorsConfig

    if model != "llama" and variant.startswith("block"):
        pytest.skip("transformers 5.24 dequantizes fused FP8 experts with per-tensor / per-channel scales only")
    ours = _load(ckpts.dequantized(model, variant)).state_dict()
    theirs = _load(ckpts.ct(model, variant), quantization_config=CompressedTensorsConfig(dequantize=True)).state_dict()
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert torch.equal(theirs[name], t), name


def test_static_input_scales(ckpts):
    """Each static ``input_scale`` is max |input| / 448 over the calibration tokens, recomputed here
    with hooks on the float model (so a scale cannot sit on the wrong linear)."""
    from tests.ct_checkpoints import CALIBRATION

    spec, tensors = SPECS["llama"], read_tensors(ckpts.ct("llama", "channel"))
    model = _load(ckpts.float("llama")).eval()
    amax: dict[str, float] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(lambda m, args, name=name: amax.__setitem__(
                name, max(amax.get(name, 0.0), args[0].abs().max().item())))
    generator = torch.Generator().manual_seed(spec.seed + 1)
    passes, batch, tokens = CALIBRATION
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randint(0, spec.vocab_size, (batch, tokens), generator=generator), use_cache=False)
    assert {n.removesuffix(".input_scale") for n in tensors if n.endswith(".input_scale")} == set(amax)
    for name, value in amax.items():
        torch.testing.assert_close(tensors[f"{name}.input_scale"], torch.tensor([value / 448]), rtol=1e-6, atol=0)
