"""config.json values and ``--expert-map`` files are checked where they enter: each bad value is
one ConfigError naming the field and the value (a map's layers, experts and slots: LayoutError
naming the map file and the layer key), never a traceback, a silent ``int()`` or a build of
millions of layers. The messages users see are pinned exactly.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import distload
from distload import LoadConfig
from distload.prepare import prepare
from distload.checkpoint.directory import open_checkpoint
from distload.comm import SOLO, Collectives
from distload.dryrun import dry_run
from distload.errors import CheckpointError, ConfigError, LayoutError, PlanError
from distload.expert_map import read_expert_map
from distload.experts import ExpertFacts
from distload.layout import Layout
from distload.models import BuildContext, build_model, check_config, expert_facts, reference_model
from tests.hf_checkpoints import copy_checkpoint, delete_tensors
from tests.synthetic import llama_config

# ---- one valid config per reader (each must build) ---------------------------------------------

ATTENTION = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False, "hidden_act": "silu"}
BASES = {
    "llama": llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}),
    "qwen2": {**ATTENTION, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
              "layer_types": ["full_attention", "sliding_attention"]},
    "mistral": {**ATTENTION, "model_type": "mistral", "sliding_window": 5, "head_dim": None},
    "mixtral": {**ATTENTION, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                "sliding_window": None},
    "qwen2_moe": {**ATTENTION, "model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "norm_topk_prob": False,
                  "use_sliding_window": False, "sliding_window": 0, "decoder_sparse_step": 1},
    "qwen3_moe": {**ATTENTION, "model_type": "qwen3_moe", "num_hidden_layers": 3, "num_local_experts": 8,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
                  "mlp_only_layers": [1]},
    "deepseek_v3": {**ATTENTION, "model_type": "deepseek_v3", "num_hidden_layers": 3, "num_key_value_heads": 4,
                    "head_dim": 4, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                    "q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
                    "v_head_dim": 8, "num_nextn_predict_layers": 1, "routed_scaling_factor": 2.5,
                    "rope_interleave": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "gpt_oss": {**ATTENTION, "model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": 4, "max_position_embeddings": 64,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16}},
    "llama4_text": {**ATTENTION, "model_type": "llama4_text", "num_local_experts": 4, "num_experts_per_tok": 1,
                    "intermediate_size_mlp": 64, "interleave_moe_layer_step": 2, "attention_chunk_size": 8},
    "phi3": {**ATTENTION, "model_type": "phi3", "max_position_embeddings": 64, "original_max_position_embeddings": 16,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                                 "long_factor": [2.0, 2.5, 3.0, 3.5]}},
}
EXPERTS = {"mixtral": (8, {0, 1}), "qwen2_moe": (6, {0, 1}), "qwen3_moe": (8, {0, 2}), "deepseek_v3": (8, {1, 2}),
           "gpt_oss": (4, {0, 1}), "llama4_text": (4, {1})}
"""model type -> (experts, layers with experts), by hand from BASES"""
LONGROPE = BASES["phi3"]["rope_parameters"]


def layer_names(num_layers: int, *, mtp: bool = False) -> list[str]:
    """Checkpoint names of ``num_layers`` layers (one tensor each), and DeepSeek's MTP layer after them."""
    return [f"model.layers.{i}.input_layernorm.weight" for i in range(num_layers + mtp)] + ["model.norm.weight"]


def names_of(cfg: dict) -> list[str]:
    return layer_names(cfg["num_hidden_layers"], mtp=cfg["model_type"] == "deepseek_v3")


def build(cfg: dict) -> torch.nn.Module:
    """The reference model of ``cfg`` for one rank, on meta."""
    return reference_model(BuildContext(config=cfg, tp=1, tp_rank=0, ops=SOLO, dtype=torch.float32,
                                        layout=Layout(world_size=1)))


ABSENT = object()
"""a substituted value that deletes the field"""


def edited(model: str, **changes) -> dict:
    """A copy of a base config; a value ``ABSENT`` deletes the field."""
    cfg = copy.deepcopy(BASES[model])
    for key, value in changes.items():
        if value is ABSENT:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("model", sorted(BASES))
def test_every_valid_base_config_passes_and_builds_its_layers(model):
    cfg = BASES[model]
    check_config(cfg, names_of(cfg))
    assert sorted(build(cfg).model.layers) == [str(i) for i in range(cfg["num_hidden_layers"])]


# ---- one case per kind, with the exact message --------------------------------------------------

P = "config.json "
CASES = [
    # integers are JSON integers in range (int() no longer truncates 1.9 or parses "2")
    ("llama", {"num_hidden_layers": -1}, P + "num_hidden_layers must be a positive integer, got -1"),
    ("llama", {"num_hidden_layers": 1.9}, P + "num_hidden_layers must be a positive integer, got 1.9"),
    ("llama", {"num_hidden_layers": 2.0}, P + "num_hidden_layers must be a positive integer, got 2.0"),
    ("llama", {"num_hidden_layers": "2"}, P + 'num_hidden_layers must be a positive integer, got "2"'),
    ("llama", {"num_hidden_layers": True}, P + "num_hidden_layers must be a positive integer, got true"),
    ("llama", {"vocab_size": None}, P + "vocab_size must be a positive integer, got null"),
    ("llama", {"num_attention_heads": 0}, P + "num_attention_heads must be a positive integer, got 0"),
    ("llama", {"hidden_size": 2**24 + 1}, P + "hidden_size must be at most 16777216, got 16777217"),
    ("llama", {"hidden_size": ABSENT}, P + "has no 'hidden_size', which model_type 'llama' needs"),
    # sizes that must agree
    ("llama", {"num_key_value_heads": 3}, P + "num_key_value_heads must divide num_attention_heads (16), got 3"),
    ("llama", {"head_dim": 0}, P + "head_dim must be a positive integer or null, got 0"),
    ("llama", {"head_dim": 15}, P + "head_dim must be even, got 15"),
    ("llama", {"head_dim": None, "hidden_size": 24, "num_attention_heads": 8, "num_key_value_heads": 8},
     P + "head_dim must be even, got 3 (hidden_size // num_attention_heads)"),
    ("llama", {"head_dim": None, "hidden_size": 8, "num_key_value_heads": 16},
     P + "num_attention_heads (16) must not exceed hidden_size (8) when head_dim is not given"),
    ("llama", {"num_attention_heads": 2**21, "num_key_value_heads": 1},
     P + "num_attention_heads * head_dim must be at most 16777216, got 33554432"),
    # booleans, numbers, strings, objects
    ("llama", {"tie_word_embeddings": "false"}, P + 'tie_word_embeddings must be true or false, got "false"'),
    ("llama", {"attention_bias": 0}, P + "attention_bias must be true or false, got 0"),
    ("llama", {"rms_norm_eps": float("nan")}, P + "rms_norm_eps must be a positive number, got NaN"),
    ("llama", {"rms_norm_eps": "1e-6"}, P + 'rms_norm_eps must be a positive number, got "1e-6"'),
    ("llama", {"hidden_act": 5}, P + "hidden_act must be a string, got 5"),
    ("llama", {"hidden_act": "gelu"}, P + "hidden_act 'gelu' is not supported (supported: silu)"),
    ("llama", {"rope_parameters": [1]}, P + "rope_parameters must be an object or null, got [1]"),
    ("llama", {"rope_parameters": {"rope_type": "yarn"}},
     P + "rope_type 'yarn' is not supported (supported: default, llama3)"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     P + "has no 'rope_parameters.original_max_position_embeddings', which rope_type 'llama3' needs"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                                   "low_freq_factor": 4.0}},
     P + "rope_parameters.high_freq_factor must be greater than low_freq_factor (4.0), got 4.0"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
     P + "rope_type 'linear' is not supported (supported: default, llama3)"),
    ("llama", {"rope_parameters": None, "rope_theta": -1}, P + "rope_theta must be a positive number, got -1"),
    # per-layer lists and sliding windows
    ("qwen2", {"layer_types": ["full_attention"]},
     P + "layer_types must be a list of 2 strings (one per layer) or null, got 1"),
    ("qwen2", {"layer_types": "full_attention"},
     P + 'layer_types must be a list of 2 strings (one per layer) or null, got "full_attention"'),
    ("qwen2", {"layer_types": ["full_attention", "linear_attention"]},
     P + "layer_types[1] 'linear_attention' is not supported (supported: full_attention, sliding_attention)"),
    ("qwen2", {"sliding_window": None},
     P + "sliding_window must be a positive integer when use_sliding_window is true, got null"),
    ("qwen2", {"use_sliding_window": "true"}, P + 'use_sliding_window must be true or false, got "true"'),
    ("mistral", {"sliding_window": 0}, P + "sliding_window must be a positive integer or null, got 0"),
    # experts: the count under each architecture's own key
    ("mixtral", {"num_local_experts": "8"}, P + 'num_local_experts must be a positive integer, got "8"'),
    ("mixtral", {"num_experts": 4}, P + "num_local_experts (8) and num_experts (4) disagree"),
    ("mixtral", {"num_local_experts": 2**16 + 1}, P + "num_local_experts must be at most 65536, got 65537"),
    ("mixtral", {"num_experts_per_tok": 9}, P + "num_experts_per_tok must be an integer in 1..8, got 9"),
    ("mixtral", {"intermediate_size": 2**24, "hidden_size": 2**24, "num_attention_heads": 1,
                 "num_key_value_heads": 1, "head_dim": 2},
     P + "num_local_experts * intermediate_size * hidden_size must be at most 281474976710656, "
         "got 2251799813685248"),
    ("qwen3_moe", {"num_local_experts": ABSENT}, P + "has no 'num_local_experts', which model_type 'qwen3_moe' needs"),
    ("qwen3_moe", {"mlp_only_layers": [5]},
     P + "mlp_only_layers must be a list of layer indices in 0..2 or null, got [5]"),
    ("qwen3_moe", {"mlp_only_layers": [True]},
     P + "mlp_only_layers must be a list of layer indices in 0..2 or null, got [true]"),
    ("qwen3_moe", {"decoder_sparse_step": 0}, P + "decoder_sparse_step must be a positive integer, got 0"),
    ("qwen3_moe", {"norm_topk_prob": None}, P + "norm_topk_prob must be true or false, got null"),
    ("qwen2_moe", {"shared_expert_intermediate_size": -1},
     P + "shared_expert_intermediate_size must be a non-negative integer, got -1"),
    ("qwen2_moe", {"num_experts": ABSENT}, P + "has no 'num_experts', which model_type 'qwen2_moe' needs"),
    # DeepSeek-V3's own fields
    ("deepseek_v3", {"n_routed_experts": 0}, P + "n_routed_experts must be a positive integer, got 0"),
    ("deepseek_v3", {"n_group": 3}, P + "n_group must divide n_routed_experts (8), got 3"),
    ("deepseek_v3", {"topk_group": 3}, P + "topk_group must be an integer in 1..2 or null, got 3"),
    ("deepseek_v3", {"q_lora_rank": "16"}, P + 'q_lora_rank must be a positive integer or null, got "16"'),
    ("deepseek_v3", {"v_head_dim": None}, P + "v_head_dim must be a positive integer, got null"),
    ("deepseek_v3", {"qk_rope_head_dim": 3}, P + "qk_rope_head_dim must be even, got 3"),
    ("deepseek_v3", {"routed_scaling_factor": "2.5"}, P + 'routed_scaling_factor must be a positive number, got "2.5"'),
    ("deepseek_v3", {"rope_interleave": "yes"}, P + 'rope_interleave must be true or false or null, got "yes"'),
    ("deepseek_v3", {"first_k_dense_replace": 4},
     P + "first_k_dense_replace must be an integer in 0..3 or null, got 4"),
    ("deepseek_v3", {"num_nextn_predict_layers": 100},
     P + "num_nextn_predict_layers must be an integer in 0..3, got 100"),
    ("deepseek_v3", {"num_attention_heads": 2**16, "num_key_value_heads": 2**16, "qk_nope_head_dim": 2**10},
     P + "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) must be at most 16777216, got 67371008"),
    ("deepseek_v3", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 40, "mscale_all_dim": "1",
                                                               "original_max_position_embeddings": 4096}},
     P + 'rope_scaling.mscale_all_dim must be a finite number, got "1"'),
    # yarn (gpt-oss, DeepSeek-V3) and gpt-oss's own fields
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0}},
     P + "has no 'rope_parameters.factor', which rope_type 'yarn' needs"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}},
     P + 'rope_parameters.truncate must be true or false, got "no"'),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -32}},
     P + "rope_parameters.beta_fast must be a positive number, got -32"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "longrope"}},
     P + "rope_type 'longrope' is not supported for gpt_oss (supported: default, yarn)"),
    ("gpt_oss", {"layer_types": ["sliding_attention", "chunked_attention"]},
     P + "layer_types[1] 'chunked_attention' is not supported (supported: full_attention, sliding_attention)"),
    ("gpt_oss", {"swiglu_limit": -1}, P + "swiglu_limit must be a positive number, got -1"),
    ("gpt_oss", {"num_experts_per_tok": 5}, P + "num_experts_per_tok must be an integer in 1..4, got 5"),
    # Llama 4's own fields
    ("llama4_text", {"moe_layers": [2]}, P + "moe_layers must be a list of layer indices in 0..1 or null, got [2]"),
    ("llama4_text", {"interleave_moe_layer_step": 0},
     P + "interleave_moe_layer_step must be a positive integer, got 0"),
    ("llama4_text", {"no_rope_layers": [1, 2]},
     P + "no_rope_layers must be a list of flags (1: rope, 0: none) in 0..1 or null, got [1, 2]"),
    ("llama4_text", {"no_rope_layers": [1]}, P + "no_rope_layers must have a flag for each of the 2 layers, got 1"),
    ("llama4_text", {"attention_chunk_size": None, "layer_types": ["chunked_attention", "full_attention"]},
     P + "attention_chunk_size must be a positive integer when layer_types has chunked_attention, got null"),
    ("llama4_text", {"layer_types": ["sliding_attention", "full_attention"]},
     P + "layer_types[0] 'sliding_attention' is not supported (supported: full_attention, chunked_attention)"),
    ("llama4_text", {"num_local_experts": ABSENT},
     P + "has no 'num_local_experts', which model_type 'llama4_text' needs"),
    # Phi-3's longrope, in transformers 5's rope_parameters and in the rope_scaling form released configs use
    ("phi3", {"rope_parameters": {**LONGROPE, "short_factor": [1.0, 1.0]}},
     P + "rope_parameters.short_factor must be a list of 4 positive numbers (head_dim / 2), got [1.0, 1.0]"),
    ("phi3", {"rope_parameters": {**LONGROPE, "long_factor": [2.0, 0, 3.0, 3.5]}},
     P + "rope_parameters.long_factor must be a list of 4 positive numbers (head_dim / 2), got [2.0, 0, 3.0, 3.5]"),
    ("phi3", {"rope_parameters": {**LONGROPE, "long_factor": None}},
     P + "has no 'rope_parameters.long_factor', which rope_type 'longrope' needs"),
    ("phi3", {"rope_parameters": None, "rope_theta": 10000.0,
              "rope_scaling": {"type": "longrope", "short_factor": "1.0", "long_factor": [2.0, 2.5, 3.0, 3.5]}},
     P + 'rope_scaling.short_factor must be a list of 4 positive numbers (head_dim / 2), got "1.0"'),
    ("phi3", {"rope_parameters": {**LONGROPE, "attention_factor": -1}},
     P + "rope_parameters.attention_factor must be a positive number, got -1"),
    ("phi3", {"original_max_position_embeddings": 1},
     P + "original_max_position_embeddings must be at least 2 when longrope derives its attention factor from it "
         "(sqrt(1 + ln factor / ln original)), got 1"),
    ("phi3", {"rope_parameters": {**LONGROPE, "rope_type": "dynamic", "factor": 2.0}},
     P + "rope_type 'dynamic' is not supported for phi3 (supported: default, longrope)"),
    ("phi3", {"rope_parameters": {**LONGROPE, "partial_rotary_factor": 0.5}},
     P + "partial_rotary_factor must be 1.0 for phi3 (partial rotary embeddings are not supported yet), got 0.5"),
]


@pytest.mark.parametrize("model, changes, message", CASES, ids=[f"{m}-{next(iter(c))}-{i}"
                                                              for i, (m, c, _) in enumerate(CASES)])
def test_each_bad_value_is_one_config_error_naming_field_and_value(model, changes, message):
    cfg = edited(model, **changes)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, names_of(BASES[model]))
    assert str(info.value) == message
    with pytest.raises(ConfigError) as built:  # the builders read through the same readers
        build(cfg)
    assert str(built.value) == message


def test_build_model_refuses_what_int_used_to_truncate():
    with pytest.raises(ConfigError, match="^config.json num_hidden_layers must be a positive integer, got 1.9$"):
        build_model(llama_config(num_hidden_layers=1.9))


def test_null_stands_for_the_default_only_where_transformers_allows_it():
    model = build(edited("llama", num_key_value_heads=None, head_dim=None))  # heads, hidden // heads
    assert tuple(model.model.layers["0"].self_attn.qkv_proj.weight.shape) == (3 * 256, 256)
    assert build(edited("deepseek_v3", q_lora_rank=None)).model.layers["0"].self_attn.q_proj is not None
    assert type(build(edited("qwen3_moe", mlp_only_layers=None)).model.layers["1"].mlp).__name__ == "SparseMoE"


# ---- the layer count, bounded by the checkpoint before anything is built -------------------------


def test_more_layers_than_the_checkpoint_names_are_refused_with_its_largest_index():
    with pytest.raises(ConfigError) as info:
        check_config(edited("llama", num_hidden_layers=10**7), layer_names(2))
    assert str(info.value) == ("config.json num_hidden_layers is 10000000, more than twice the 2 layers the "
                               "checkpoint has tensors for (its largest layer index is 1): this config.json does "
                               "not describe the checkpoint")
    check_config(edited("llama", num_hidden_layers=4), layer_names(2))  # twice: a short checkpoint, reported missing
    with pytest.raises(ConfigError) as none:
        check_config(BASES["llama"], ["model.embed_tokens.weight", "model.layers.x.weight"])
    assert str(none.value) == ("config.json num_hidden_layers is 2, but the checkpoint holds no layer tensors "
                               "(no name has layers.<i>.)")


def test_deepseek_mtp_layer_and_missing_middle_layers_are_no_config_error():
    cfg = BASES["deepseek_v3"]
    check_config(cfg, layer_names(3, mtp=True))  # the MTP layer sits at index 3
    check_config(edited("deepseek_v3", num_hidden_layers=4), layer_names(3, mtp=True))
    check_config(cfg, ["model.layers.2.mlp.gate.weight"])  # layers 0 and 1 absent: a missing finding later
    check_config(edited("deepseek_v3", num_hidden_layers=5), layer_names(3, mtp=True))  # layer 4: missing
    with pytest.raises(ConfigError, match=r"is 9, more than twice the 4 layers the checkpoint has tensors for "
                                          r"\(its largest layer index is 3\)"):
        check_config(edited("deepseek_v3", num_hidden_layers=9), layer_names(3, mtp=True))


@pytest.fixture()
def example_copy(tmp_path):
    return copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))


def edit_config(directory: str, **changes) -> str:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def test_ten_million_layers_fail_before_any_layer_is_built(example_copy, monkeypatch):
    path = edit_config(example_copy, num_hidden_layers=10**7)

    def no_layers(*args, **kwargs):
        raise AssertionError("a decoder layer was built")

    monkeypatch.setattr("distload.models.llama.DecoderLayer.__init__", no_layers)
    with pytest.raises(ConfigError) as info:
        dry_run(example_copy, LoadConfig(pp=2), world_size=2)
    assert info.value.file == path
    assert info.value.message == ("config.json num_hidden_layers is 10000000, more than twice the 2 layers the "
                                  "checkpoint has tensors for (its largest layer index is 1): this config.json does "
                                  "not describe the checkpoint")


def test_a_checkpoint_missing_its_last_layer_reports_it_missing(example_copy):
    names = [n for n in open_checkpoint(example_copy).tensors if n.startswith("model.layers.1.")]
    delete_tensors(example_copy, names)
    report = dry_run(example_copy, LoadConfig(), world_size=1)
    assert not report.complete and sorted(m.name for m in report.findings.missing) == sorted(names)


def test_a_checkpoint_with_a_layer_fewer_than_configured_reports_it_missing(example_copy):
    names = [n for n in open_checkpoint(example_copy).tensors if n.startswith("model.layers.0.")]
    delete_tensors(example_copy, names)
    report = dry_run(example_copy, LoadConfig(), world_size=1)
    assert not report.complete and sorted(m.name for m in report.findings.missing) == sorted(names)


def test_a_bad_value_through_a_load_names_config_json(example_copy):
    path = edit_config(example_copy, tie_word_embeddings="false")
    with pytest.raises(ConfigError) as info:
        dry_run(example_copy, LoadConfig(tp=2), world_size=2)
    assert info.value.file == path
    assert str(info.value) == f'config.json tie_word_embeddings must be true or false, got "false" [file {path}]'


def test_cli_exits_1_with_one_line_for_a_bad_config_value(example_copy, tmp_path):
    path = edit_config(example_copy, num_hidden_layers=-1)
    proc = subprocess.run([sys.executable, "-m", "distload", example_copy, "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"distload: error: config.json num_hidden_layers must be a positive "
                                        f"integer, got -1 [file {path}, rank 0]"]


# ---- JSON parse hazards of config.json ----------------------------------------------------------

DEEP = '{"a": ' + "[" * 65 + "]" * 65 + "}"
HAZARDS = [
    ("[" * 100_000, "config.json is unreadable: nested more than 64 levels deep"),
    (DEEP, "config.json is unreadable: nested more than 64 levels deep"),  # parses, but too deep to keep
    ('{"vocab_size": ' + "9" * 5000 + "}", "config.json is unreadable: a number has more than 4300 digits"),
    (b'{"model_type": "\xff"}', "config.json is unreadable: not UTF-8 (byte 0xff at offset 16)"),
    ("{oops", "config.json is unreadable: Expecting property name enclosed in double quotes: line 1 column 2 "
              "(char 1)"),
]


@pytest.mark.parametrize("text, message", HAZARDS, ids=["nested", "deep", "digits", "utf8", "syntax"])
def test_config_json_parse_hazards_are_one_checkpoint_error(example_copy, text, message):
    path = os.path.join(example_copy, "config.json")
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(example_copy)
    assert info.value.file == path and info.value.message == message


def test_nan_parses_and_is_refused_where_a_number_must_be_finite(example_copy):
    path = os.path.join(example_copy, "config.json")
    with open(path) as f:
        text = f.read().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ConfigError) as info:
        dry_run(example_copy, LoadConfig(), world_size=1)
    assert str(info.value) == f"config.json rms_norm_eps must be a positive number, got NaN [file {path}]"


# ---- the expert map -----------------------------------------------------------------------------

FACTS = ExpertFacts(num_experts=8, num_layers=3, sparse_layers=frozenset({0, 2}))
ONE_EACH = {str(e): [e] for e in range(8)}
M = "expert map"
MAP_CASES = [
    (b"{", ConfigError, M + " is unreadable: Expecting property name enclosed in double quotes: line 1 column 2 "
                            "(char 1)"),
    (b"[" * 100_000, ConfigError, M + " is unreadable: nested more than 64 levels deep"),
    (b'{"layers": {"0": {"0": [' + b"7" * 5000 + b"]}}}", ConfigError,
     M + " is unreadable: a number has more than 4300 digits"),
    (b'{"layers": "\xfe"}', ConfigError, M + " is unreadable: not UTF-8 (byte 0xfe at offset 12)"),
    (b'{"layers": {"default": {"0": [0], "0": [1]}}}', ConfigError,
     M + ' is unreadable: key "0" appears twice in one object'),
    ([], LayoutError, M + ': expected {"layers": {"<layer>|default": {"<expert>": [slot, ...]}}}, got []'),
    ({"layers": {}}, LayoutError,
     M + ': expected {"layers": {"<layer>|default": {"<expert>": [slot, ...]}}}, got {"layers": {}}'),
    ({"layers": {"01": ONE_EACH}}, LayoutError, M + ": layer key '01' is not 'default' or a layer in 0..2"),
    ({"layers": {"-1": ONE_EACH}}, LayoutError, M + ": layer key '-1' is not 'default' or a layer in 0..2"),
    ({"layers": {"\u00b2": ONE_EACH}}, LayoutError, M + ": layer key '\u00b2' is not 'default' or a layer in 0..2"),
    ({"layers": {"3": ONE_EACH}}, LayoutError, M + ": layer key '3' is not 'default' or a layer in 0..2"),
    ({"layers": {"9" * 5000: ONE_EACH}}, LayoutError,
     M + ": layer key '" + "9" * 56 + "' ... is not 'default' or a layer in 0..2"),
    ({"layers": {"1": ONE_EACH}}, LayoutError, M + ": layer key '1' names a layer without experts (a dense MLP)"),
    ({"layers": {"0": [0]}}, LayoutError, M + " layer 0: expected an object of expert -> slot list, got [0]"),
    ({"layers": {"0": {**ONE_EACH, "8": [8]}}}, LayoutError, M + " layer 0: expert '8' is not in 0..7"),
    ({"layers": {"0": {**ONE_EACH, "7": [7.0]}}}, LayoutError,
     M + " layer 0: expert 7 needs a list of slot numbers (integers >= 0), got [7.0]"),
    ({"layers": {"0": {**ONE_EACH, "7": [-1]}}}, LayoutError,
     M + " layer 0: expert 7 needs a list of slot numbers (integers >= 0), got [-1]"),
    ({"layers": {"0": {**ONE_EACH, "7": [True]}}}, LayoutError,
     M + " layer 0: expert 7 needs a list of slot numbers (integers >= 0), got [true]"),
    ({"layers": {"0": {**ONE_EACH, "7": []}}}, LayoutError,
     M + " layer 0: expert 7 needs a list of slot numbers (integers >= 0), got []"),
    ({"layers": {"0": {**ONE_EACH, "7": [6]}}}, LayoutError, M + " layer 0: slot 6 is given to experts 6 and 7"),
    ({"layers": {"default": {str(e): [e] for e in range(7)}}}, LayoutError,
     M + " layer default: experts [7] have no slot"),
    ({"layers": {"0": {**ONE_EACH, "7": [10**30]}}}, LayoutError,
     M + " layer 0: slots must be 0..7, each once; got [0, 1, 2, 3, 4, 5, 6, 1000000000000000000000000000000]"),
    ({"layers": {"2": {**ONE_EACH, "0": [0, 8]}}}, LayoutError,
     M + " layer 2: 9 expert slots (8 experts + 1 redundant) do not divide over ep=2; choose a redundant count "
         "that makes experts + redundant a multiple of 2"),
    ({"layers": {"default": {**ONE_EACH, "0": [0, 8], "1": [1, 9]}}}, LayoutError,
     M + " layer default: expert 0 has two copies in expert group 0: every replica must be on another group than "
         "its original (change the redundant experts, the placement or ep)"),
]


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("maps"))


def write_map(directory: str, doc: object) -> str:
    path = os.path.join(directory, "map.json")
    with open(path, "wb") as f:
        f.write(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return path


@pytest.mark.parametrize("doc, kind, message", MAP_CASES, ids=[str(i) for i in range(len(MAP_CASES))])
def test_each_bad_expert_map_is_one_error_naming_the_file_and_key(map_dir, doc, kind, message):
    path = write_map(map_dir, doc)
    with pytest.raises(kind) as info:
        read_expert_map(path, FACTS, ep=2, placement="round_robin")
    assert type(info.value) is kind and info.value.file == path
    assert info.value.message == message


def test_an_expert_map_that_is_no_regular_file_or_for_a_dense_model(map_dir):
    missing = os.path.join(map_dir, "none.json")
    with pytest.raises(ConfigError) as info:
        read_expert_map(missing, FACTS, ep=1, placement="linear")
    assert (info.value.file, info.value.message) == (missing, "cannot read expert map: No such file or directory")
    fifo = os.path.join(map_dir, "fifo.json")
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:  # refused without blocking on the FIFO's writer
        read_expert_map(fifo, FACTS, ep=1, placement="linear")
    assert info.value.message == "cannot read expert map: it is a FIFO, not a regular file"
    with pytest.raises(LayoutError) as info:
        read_expert_map(write_map(map_dir, {"layers": {"default": ONE_EACH}}), None, ep=1, placement="linear",
                        model_type="llama")
    assert info.value.message == ("--expert-map applies to mixture-of-experts models, and model_type 'llama' "
                                  "has no experts")


@pytest.mark.parametrize("model", sorted(EXPERTS))
def test_the_expert_count_comes_from_each_architectures_own_key(model):
    experts, sparse = EXPERTS[model]
    facts = expert_facts(BASES[model])
    assert (facts.num_experts, facts.sparse_layers, facts.num_layers) == (experts, sparse,
                                                                          BASES[model]["num_hidden_layers"])
    assert expert_facts(BASES["llama"]) is None


def test_qwen3_moe_accepts_either_expert_key():
    older = edited("qwen3_moe", num_local_experts=ABSENT, num_experts=4)  # transformers 4.x wrote num_experts
    assert expert_facts(older).num_experts == 4


DEEPSEEK_MAP = {"layers": {"default": {str(e): [7 - e] for e in range(8)}, "2": ONE_EACH}}


@pytest.fixture()
def deepseek_dir(tmp_path):
    """A DeepSeek-V3 checkpoint of the layer norms only (and its MTP layer): the plan is made,
    the rest is missing."""
    directory = tmp_path / "deepseek"
    directory.mkdir()
    save_file({name: torch.ones(32) for name in layer_names(3, mtp=True)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(BASES["deepseek_v3"]))
    return str(directory)


def test_an_expert_map_on_a_deepseek_checkpoint_places_its_experts(deepseek_dir, tmp_path):
    path = write_map(str(tmp_path), DEEPSEEK_MAP)
    config = LoadConfig(dp=2, ep=2, expert_map=path)
    layout = Layout(world_size=2, dp=2, ep=2)
    _, _, specs, _ = prepare(deepseek_dir, config, layout, reference_model, rank=0, ops=Collectives(None, 1),
                             stage_ops=Collectives(None, 2))
    slots = {s.name.split(".")[2]: s.experts.placement.slots for s in specs if s.experts is not None}
    assert slots == {"1": (7, 6, 5, 4, 3, 2, 1, 0), "2": tuple(range(8))}  # layer 1 from "default"
    report = dry_run(deepseek_dir, config, world_size=2)
    assert not report.complete and "model.layers.3.input_layernorm.weight" in report.ignored


def test_cli_exits_2_with_one_line_for_an_expert_map_that_does_not_fit(deepseek_dir, tmp_path):
    # like any layout option that does not fit the model (exit 1: a map file that cannot be read)
    path = write_map(str(tmp_path), {"layers": {"0": ONE_EACH}})  # layer 0 of DeepSeek-V3 is dense
    proc = subprocess.run([sys.executable, "-m", "distload", deepseek_dir, "--dry-run", "--world", "2", "--dp", "2",
                           "--ep", "2", "--expert-map", path], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"distload: error: expert map: layer key '0' names a layer without "
                                        f"experts (a dense MLP) [file {path}]"]
    with open(path, "w") as f:
        f.write('{"layers": {"default": {"0": [' + "7" * 5000 + "]}}}")
    proc = subprocess.run([sys.executable, "-m", "distload", deepseek_dir, "--dry-run", "--world", "1",
                           "--expert-map", path], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"distload: error: expert map is unreadable: a number has more than 4300 "
                                        f"digits [file {path}]"]


# ---- properties ---------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1, 2.0, "4", "full_attention", "sliding_attention", 2**24 + 1, 10**7]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
"""values a config.json field may hold, weighted towards the plausible"""

KEYS = sorted({key for cfg in BASES.values() for key in cfg} | {
    "rope_scaling", "rope_theta", "mlp_bias", "num_experts", "num_local_experts", "rope_parameters.rope_type",
    "rope_parameters.factor", "rope_parameters.low_freq_factor", "rope_parameters.original_max_position_embeddings"})


def substitute(cfg: dict, key: str, value: object) -> None:
    """Sets (or with ABSENT deletes) ``key``; ``a.b`` is field ``b`` of object ``a`` when there is one."""
    outer, _, inner = key.partition(".")
    target, field = (cfg[outer], inner) if inner and isinstance(cfg.get(outer), dict) else (cfg, outer)
    if value is ABSENT:
        target.pop(field, None)
    else:
        target[field] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(sorted(BASES)),
       edits=st.lists(st.tuples(st.sampled_from(KEYS), JSONISH | st.just(ABSENT)), min_size=1, max_size=3))
def test_any_config_value_builds_or_raises_config_error(model, edits):
    cfg = copy.deepcopy(BASES[model])
    for key, value in edits:
        substitute(cfg, key, value)
    try:
        check_config(cfg, names_of(BASES[model]))
        build(cfg)
    except ConfigError as err:
        assert str(err).startswith(("config.json ", "model_type ")) and "\n" not in str(err)


@st.composite
def dense_configs(draw) -> dict:
    """Any config transformers would build for a dense type: sizes that agree, values of the right kinds."""
    model_type = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    heads = draw(st.sampled_from([1, 2, 4, 6, 8]))
    layers = draw(st.integers(1, 4))
    head_dim = draw(st.none() | st.integers(1, 16).map(lambda n: 2 * n))
    hidden = heads * 2 * draw(st.integers(1, 8)) if head_dim is None else draw(st.integers(1, 96))
    cfg = {"model_type": model_type, "vocab_size": draw(st.integers(1, 300)), "hidden_size": hidden,
           "intermediate_size": draw(st.integers(1, 64)), "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": draw(st.sampled_from([None] + [k for k in range(1, heads + 1) if heads % k == 0])),
           "head_dim": head_dim, "tie_word_embeddings": draw(st.booleans()),
           "rms_norm_eps": draw(st.floats(1e-12, 1.0)), "attention_bias": draw(st.booleans()),
           "rope_parameters": draw(st.none() | st.just({"rope_type": "default", "rope_theta": 1e6}))}
    if model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=draw(st.booleans()), sliding_window=draw(st.integers(1, 64)),
                   layer_types=draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                             min_size=layers, max_size=layers)))
    if model_type == "mistral":
        cfg["sliding_window"] = draw(st.none() | st.integers(1, 64))
    return cfg


@settings(max_examples=60, deadline=None)
@given(cfg=dense_configs())
def test_any_valid_dense_config_builds(cfg):
    check_config(cfg, names_of(cfg))
    model = build(cfg)
    assert len(model.model.layers) == cfg["num_hidden_layers"]
    assert tuple(model.model.embed_tokens.weight.shape) == (cfg["vocab_size"], cfg["hidden_size"])


@st.composite
def expert_maps(draw) -> object:
    """A valid map (FACTS) with one part replaced by anything."""
    doc = {"layers": {"default": dict(ONE_EACH), "2": {str(e): [7 - e] for e in range(8)}}}
    part = draw(st.sampled_from(["doc", "layers", "layer key", "entry", "expert key", "slots", "slot"]))
    value = draw(JSONISH)
    text = draw(st.text(max_size=6) | st.sampled_from(["0", "1", "2", "3", "7", "8", "default", "00"]))
    entry = doc["layers"]["2"]
    if part == "doc":
        return value
    if part == "layers":
        doc["layers"] = value
    elif part == "layer key":
        doc["layers"][text] = doc["layers"].pop("2")
    elif part == "entry":
        doc["layers"]["2"] = value
    elif part == "expert key":
        entry[text] = entry.pop("3")
    elif part == "slots":
        entry["3"] = value
    else:
        entry["3"] = [value]
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=expert_maps() | st.binary(max_size=40), ep=st.sampled_from([1, 2, 4, 8]),
       placement=st.sampled_from(["linear", "round_robin"]))
def test_any_expert_map_reads_or_raises_config_or_layout_error(map_dir, doc, ep, placement):
    path = write_map(map_dir, doc)
    try:
        slots = read_expert_map(path, FACTS, ep=ep, placement=placement)
    except (ConfigError, LayoutError) as err:
        assert err.file == path and "\n" not in err.message
        return
    assert set(slots) <= {-1, 0, 2} and all(sorted(set(p.slots)) == list(range(8)) for p in slots.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(perms=st.lists(st.permutations(range(8)), min_size=1, max_size=3), ep=st.sampled_from([1, 2, 4, 8]),
       placement=st.sampled_from(["linear", "round_robin"]))
def test_any_valid_expert_map_is_read_as_written(map_dir, perms, ep, placement):
    keys = ["default", "0", "2"][:len(perms)]
    doc = {"layers": {key: {str(e): [slot] for slot, e in enumerate(perm)} for key, perm in zip(keys, perms)}}
    placements = read_expert_map(write_map(map_dir, doc), FACTS, ep=ep, placement=placement)
    slots = {layer: p.slots for layer, p in placements.items()}
    assert slots == {(-1 if key == "default" else int(key)): tuple(perm) for key, perm in zip(keys, perms)}


@pytest.fixture(scope="module")
def fuzz_copy(tmp_path_factory):
    return copy_checkpoint(distload.example_checkpoint(), str(tmp_path_factory.mktemp("fuzz") / "ckpt"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS + ["dtype", "torch_dtype"]), JSONISH | st.just(ABSENT)),
                      min_size=1, max_size=2))
def test_any_config_value_in_a_checkpoint_plans_or_raises_a_distload_error(fuzz_copy, edits):
    with open(os.path.join(distload.example_checkpoint(), "config.json")) as f:
        cfg = json.load(f)
    for key, value in edits:
        substitute(cfg, key, value)
    path = os.path.join(fuzz_copy, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    try:
        dry_run(fuzz_copy, LoadConfig(), world_size=1)
    except ConfigError as err:
        assert err.file == path
    except (CheckpointError, PlanError) as err:  # a well-typed size the checkpoint's shapes do not have
        assert err.file is not None
