"""Tiny random checkpoints written by Hugging Face transformers, and ways to damage them.

Builders run in the test process (never in pool workers): they import transformers.
Checkpoints are float32 (``HFSpec.dtype`` may make them bf16), written by ``save_pretrained(max_shard_size=...)`` so it
has several shards and a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True, kw_only=True)
class HFSpec:
    """What to build: a model type and its (tiny) sizes."""

    model_type: str
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)
    """further config fields (attention_bias, sliding_window, ...)"""
    seed: int = 0
    dtype: str = "float32"
    """dtype the checkpoint is saved in (parameters are drawn in float32, then cast)"""


QWEN3_MOE = HFSpec(model_type="qwen3_moe", num_hidden_layers=3, seed=13,
                   extra={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                          "norm_topk_prob": True, "mlp_only_layers": [1]})
"""8 experts of width 32, q/k norms, renormalized top-k, layer 1 a dense MLP (intermediate_size 96)"""

DEEPSEEK_V3 = HFSpec(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=4, seed=21,
                     extra={"moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
                            "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                            "q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
                            "v_head_dim": 8})
"""multi-head latent attention, a dense first layer, 8 routed experts of width 16 and a shared one;
kv_a_proj_with_mqa [12, 32] (kv_lora_rank 8 + qk_rope 4) and kv_b_proj [64, 8]"""

DENSE_SPECS = {
    # llama3 rope scaling, with an original context short enough to scale some frequencies
    "llama": HFSpec(model_type="llama", vocab_size=128, intermediate_size=128,
                    extra={"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16}}),
    # vocabulary 130: padding rows at tp=4; every bias llama can have
    "llama_tied": HFSpec(model_type="llama", vocab_size=130, tie_word_embeddings=True, seed=1,
                         extra={"attention_bias": True, "mlp_bias": True}),
    # q/k/v biases; vocabulary 250: padding rows at tp=4; layer 1 (only) has a sliding window
    "qwen2": HFSpec(model_type="qwen2", vocab_size=250, seed=2,
                    extra={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    # q/k norms; 8 query heads so that tp=8 fits, heads x head_dim (128) differs from the
    # hidden size (64); 4 KV heads: two per rank at tp=2, each on two ranks at tp=8;
    # vocabulary 33 at tp=8: blocks of 5 rows, block 6 has 3, block 7 is only padding
    "qwen3": HFSpec(model_type="qwen3", vocab_size=33, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=128, seed=3),
    # a sliding window shorter than the test sequence
    "mistral": HFSpec(model_type="mistral", vocab_size=128, seed=4, extra={"sliding_window": 5}),
}
"""the dense models of the transformers checkpoint tests (test_hf_dense, test_pipeline)"""

MOE_SPECS = {
    # 8 experts of width 32 (mixtral's intermediate_size is the expert's); a sliding window
    # shorter than the test sequence; transformers 5 writes block_sparse_moe.experts.N.w1/w2/w3
    "mixtral": HFSpec(model_type="mixtral", intermediate_size=32, seed=11,
                      extra={"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 5}),
    # 6 experts (so that round-robin slots of redundant copies land on other groups), a gated
    # shared expert of width 48, top-k weights not renormalized; q/k/v biases
    "qwen2_moe": HFSpec(model_type="qwen2_moe", seed=12,
                        extra={"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    # q/k norms, renormalized top-k, and layer 1 a dense MLP (intermediate_size 96)
    "qwen3_moe": HFSpec(model_type="qwen3_moe", num_hidden_layers=3, seed=13,
                        extra={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "norm_topk_prob": True, "mlp_only_layers": [1]}),
}
"""the MoE models of the transformers checkpoint tests (test_hf_moe and the quantization tests)"""

CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "mistral": "MistralConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
                  "qwen3_moe": "Qwen3MoeConfig", "deepseek_v3": "DeepseekV3Config",
                  "phi3": "Phi3Config", "gpt_oss": "GptOssConfig", "gemma3_text": "Gemma3TextConfig",
                  "llama4_text": "Llama4TextConfig"}
"""model_type -> transformers config class; MoE sizes (experts, top-k, expert widths) go in ``extra``"""

NO_HEAD_DIM = {"deepseek_v3"}
"""model types whose head sizes come from ``extra`` (MLA: qk_nope/qk_rope/v_head_dim), not ``head_dim``"""


@dataclass(frozen=True, kw_only=True)
class WrappedSpec:
    """A multimodal checkpoint: the text model of ``text`` inside ``config_class`` (its
    ``text_config``) beside a tiny vision tower, written by ``model_class``."""

    text: HFSpec
    config_class: str
    """the wrapper's transformers config class (``Gemma3Config``)"""
    model_class: str
    """the transformers model class that writes it (``Gemma3ForConditionalGeneration``)"""
    vision: dict
    """the vision_config fields"""
    prefix: str = "language_model."
    """what the checkpoint puts before the text model's own names"""
    extra: dict = field(default_factory=dict)
    """further top-level config fields"""
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size


@dataclass(frozen=True, kw_only=True)
class ConfigSpec:
    """A checkpoint of a model type whose config takes other names than HFSpec's (gpt2's n_embd):
    ``config_class(**fields)``, written by AutoModelForCausalLM."""

    config_class: str
    fields: dict
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.fields["vocab_size"]


def hf_config(spec: HFSpec | WrappedSpec | ConfigSpec):
    import transformers

    if isinstance(spec, ConfigSpec):
        return getattr(transformers, spec.config_class)(**spec.fields)
    if isinstance(spec, WrappedSpec):
        return getattr(transformers, spec.config_class)(text_config=hf_config(spec.text).to_dict(),
                                                        vision_config=dict(spec.vision),
                                                        **{"tie_word_embeddings": spec.text.tie_word_embeddings,
                                                           **spec.extra})
    cls = getattr(transformers, CONFIG_CLASSES[spec.model_type])
    head_dim = {} if spec.model_type in NO_HEAD_DIM else {"head_dim": spec.head_dim}
    return cls(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
               intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
               num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
               tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=1e-6,
               max_position_embeddings=64, dtype=spec.dtype, **head_dim, **spec.extra)


def write_hf_checkpoint(directory: str, spec: HFSpec | WrappedSpec | ConfigSpec, *,
                        max_shard_size: str = "48KB") -> str:
    """Builds a random model of ``spec`` with transformers and saves it in several shards.

    Every parameter is re-drawn from a fixed seed (transformers initializes norms to
    one and biases to zero, which would hide a norm or bias loaded into the wrong place),
    and so is DeepSeek-V3's router ``e_score_correction_bias`` buffer (zero by default,
    which would leave the group / expert choice to the plain scores).
    """
    import transformers

    torch.manual_seed(spec.seed)
    if isinstance(spec, WrappedSpec):
        model = getattr(transformers, spec.model_class)._from_config(hf_config(spec), dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    if isinstance(spec, HFSpec) and spec.dtype != "float32":
        model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.exists(os.path.join(directory, INDEX)), files
    return directory


def hf_logits(directory: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Returns transformers' float32 logits for ``input_ids`` (eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def hf_text_logits(directory: str, prefix: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Returns the float32 logits of transformers' own text model (``AutoModelForCausalLM`` of the
    checkpoint's ``text_config``) holding the checkpoint's tensors under ``prefix``, prefix removed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text_config = AutoConfig.from_pretrained(directory).get_text_config()
    model = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32, attn_implementation="eager")
    state = {n[len(prefix):]: t for n, t in read_tensors(directory).items() if n.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(n == "lm_head.weight" for n in missing), (missing, unexpected)
    model.tie_weights()
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Returns every tensor of the checkpoint, by name (read with safetensors.safe_open; without an
    index, of its one ``model.safetensors``)."""
    from safetensors import safe_open

    indexed = os.path.exists(os.path.join(directory, INDEX))
    out = {}
    for fname in sorted(set(_weight_map(directory).values())) if indexed else ["model.safetensors"]:
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def delete_tensors(directory: str, names: list[str]) -> None:
    """Removes tensors from their shard files and from the index."""
    from safetensors.torch import load_file, save_file

    index = _read_index(directory)
    weight_map = index["weight_map"]
    for fname in sorted({weight_map[n] for n in names}):
        path = os.path.join(directory, fname)
        tensors = load_file(path)
        for n in names:
            tensors.pop(n, None)
        save_file(tensors, path, metadata={"format": "pt"})
    for n in names:
        del weight_map[n]
    _write_index(directory, index)


def put_tensors(directory: str, tensors: dict[str, torch.Tensor]) -> None:
    """Adds (or replaces) tensors, placing new ones in the last shard, and updates the index."""
    from safetensors.torch import load_file, save_file

    index = _read_index(directory)
    weight_map = index["weight_map"]
    last = sorted(set(weight_map.values()))[-1]
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        by_file.setdefault(weight_map.get(name, last), {})[name] = t
    for fname, new in by_file.items():
        path = os.path.join(directory, fname)
        current = load_file(path)
        current.update({n: t.contiguous() for n, t in new.items()})
        save_file(current, path, metadata={"format": "pt"})
        weight_map.update({n: fname for n in new})
    _write_index(directory, index)


def _read_index(directory: str) -> dict:
    with open(os.path.join(directory, INDEX)) as f:
        return json.load(f)


def _write_index(directory: str, index: dict) -> None:
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def _weight_map(directory: str) -> dict[str, str]:
    return _read_index(directory)["weight_map"]


def token_ids(spec: HFSpec) -> torch.Tensor:
    """Two sequences of 10 tokens that include the first and last vocabulary rows."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, spec.vocab_size, (2, 10), generator=gen)
    ids[0, 0], ids[1, 3], ids[1, 9] = spec.vocab_size - 1, 0, spec.vocab_size - 2
    return ids


class CheckpointCache:
    """Base checkpoints of ``specs`` written once by name, fresh copies of them to damage, and
    transformers' own logits for ``token_ids`` (a session fixture per test module)."""

    def __init__(self, root, specs) -> None:
        self.root, self.specs = root, specs
        self._dirs: dict[str, str] = {}
        self._logits: dict[str, torch.Tensor] = {}
        self._copies = 0

    def path(self, name: str) -> str:
        if name not in self._dirs:
            self._dirs[name] = write_hf_checkpoint(str(self.root / name), self.specs[name])
        return self._dirs[name]

    def copy(self, name: str) -> str:
        """Returns a fresh copy of a base checkpoint, to damage."""
        self._copies += 1
        return copy_checkpoint(self.path(name), str(self.root / f"{name}-copy{self._copies}"))

    def reference_logits(self, name: str) -> torch.Tensor:
        if name not in self._logits:
            spec = self.specs[name]
            if isinstance(spec, WrappedSpec):  # the text model on the same weights
                self._logits[name] = hf_text_logits(self.path(name), spec.prefix, token_ids(spec))
            else:
                self._logits[name] = hf_logits(self.path(name), token_ids(spec))
        return self._logits[name]


def save_float_twin(src: str, dst: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Saves ``tensors`` as a checkpoint beside ``src``'s side files: each tensor in the shard of the
    ``src`` tensor its name (or its module's first packed tensor) lives in, with a fresh index."""
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    for fname in os.listdir(src):
        if not fname.endswith(".safetensors") and fname not in ("config.json", INDEX):
            shutil.copy(os.path.join(src, fname), os.path.join(dst, fname))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(src, INDEX)) as f:
        src_map = json.load(f)["weight_map"]
    by_module = {n.rpartition(".")[0]: fname for n, fname in sorted(src_map.items(), reverse=True)}
    weight_map = {n: src_map.get(n) or by_module[n.rpartition(".")[0]] for n in tensors}
    for fname in sorted(set(weight_map.values())):
        save_file({n: tensors[n].contiguous() for n, f in weight_map.items() if f == fname},
                  os.path.join(dst, fname), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dst, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return dst


def renamed_checkpoint(src: str, dst: str, rename: Callable[[str], str]) -> str:
    """Writes ``src`` again at ``dst`` with every tensor renamed by ``rename`` (the same data, shards
    and side files), as another writer's layout of the same model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    index = _read_index(src)
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(src, fname))
        save_file({rename(n): t for n, t in tensors.items()}, os.path.join(dst, fname), metadata={"format": "pt"})
    index["weight_map"] = {rename(n): fname for n, fname in index["weight_map"].items()}
    _write_index(dst, index)
    return dst


def as_4_52(name: str) -> str:
    """A transformers 5 LLaVA-style name (LLaVA, Gemma 3) as transformers 4.52 to 4.57 wrote it: the
    text body under ``model.language_model.``, the head at the top level, every other part under ``model.``."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model."):
        return name[len("language_model."):]  # lm_head.weight
    return "model." + name  # the vision tower and the projector


def check_only_missing(pool, directory: str, deleted: str, tp: int = 2) -> None:
    """Loads ``directory`` on ``tp`` ranks (TP only) and checks that every rank's load failed with
    ``deleted`` as its one missing tensor, owned by every rank, nothing unexpected or inconsistent,
    and that the dry run plans the same findings."""
    import distload
    from distload.dryrun import dry_run
    from tests import jobs

    results = pool.run(tp, jobs.load_outcome, directory, tp)
    planned = dry_run(directory, distload.LoadConfig(tp=tp), world_size=tp).to_json()
    for r in results:
        assert r["raised"] is True
        assert r["report"]["missing"] == [{"name": deleted, "owners": list(range(tp))}]
        assert r["report"]["unexpected"] == [] and r["report"]["inconsistent"] == []
        for kind in ("missing", "ignored", "unexpected", "num_units"):
            assert planned[kind] == r["report"][kind], kind


def check_clean_report(report: dict, ignored: list[dict]) -> None:
    """A report JSON of a usable, complete load with no findings, whose ignored tensors are ``ignored``."""
    assert report["complete"] is True and report["ok"] is True, report
    for kind in ("missing", "inconsistent", "unexpected", "mismatched", "defaulted"):
        assert report[kind] == [], (kind, report[kind])
    assert report["ignored"] == ignored
