"""Quantization configs, the scale specs they declare, and planning (no process group).

Configs here are written the way the tools that make FP8 checkpoints write them
(DeepSeek-V3's ``fp8`` block config; compressed-tensors' ``config_groups``); checkpoints
come from the test writer in ``tests/fp8_checkpoints.py``. Plans are checked at many
simulated ranks: every scale unit is owned by exactly the ranks that own its weight.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import distload
from distload import ConfigError, LoadConfig, PlanError
from distload.prepare import prepare
from distload.comm import Collectives
from distload.dryrun import dry_run
from distload.experts import ExpertPlacement
from distload.layers import ColumnParallelLinear, Part, RowParallelLinear
from distload.layers.moe import FusedExperts
from distload.layout import Layout
from distload.models import reference_model
from distload.plan import check_tiling
from distload.quant import SerializedFP8, quant_config
from distload.quant.base import WeightGeometry
from distload.spec import Role
from tests.fp8_checkpoints import write_block_fp8_checkpoint
from tests.hf_checkpoints import HFSpec, copy_checkpoint, put_tensors, read_tensors, write_hf_checkpoint

pytest.importorskip("transformers")

BLOCK_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16],
             "modules_to_not_convert": ["lm_head"]}


def ct_config(weights: dict, inputs: dict | None = None, **top) -> dict:
    """A compressed-tensors quantization_config with one group targeting every Linear."""
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                                **weights},
             "input_activations": inputs, "output_activations": None, "format": "float-quantized"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": group},
            "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None, "quantization_status": "compressed",
            **top}


# ------------------------------------------------------------------------------- config parsing


def test_block_fp8_config_quantizes_linears_and_keeps_the_ignored_ones():
    q = quant_config({"quantization_config": BLOCK_FP8})
    method = q.method_for("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.q_proj"])
    assert isinstance(method, SerializedFP8) and method.strategy == "block" and method.block == (16, 16)
    assert method.scale_suffix == "weight_scale_inv"
    assert q.method_for("lm_head", ["lm_head"]) is None
    assert not q.kv_cache_fp8


def test_compressed_tensors_strategies_and_static_inputs():
    static = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    dynamic = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    for strategy in ("tensor", "channel", "block"):
        q = quant_config({"quantization_config": ct_config({"strategy": strategy, "block_structure": [8, 16]},
                                                           static)})
        m = q.method_for("x", ["model.layers.0.mlp.down_proj"])
        assert (m.strategy, m.static_input, m.scale_suffix) == (strategy, True, "weight_scale")
        assert q.method_for("x", ["model.layers.0.mlp.gate"]) is None  # ignored by regex
    m = quant_config({"quantization_config": ct_config({"strategy": "channel"}, dynamic)}).method_for("x", ["a.b"])
    assert not m.static_input


def test_kv_cache_scheme_or_option_declares_kv_scales():
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    assert quant_config({"quantization_config": ct_config({"strategy": "channel"}, kv_cache_scheme=kv)}).kv_cache_fp8
    assert quant_config({}, kv_cache_dtype="fp8").kv_cache_fp8
    assert not quant_config({}).kv_cache_fp8


@pytest.mark.parametrize("qc, text", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported (supported: fp8, compressed-tensors"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not supported (supported: e4m3)"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "supports activation_scheme dynamic only"),
    (ct_config({"strategy": "group", "group_size": 128}), "strategy 'group' (group group_0) is not supported "
                                                           "(supported: tensor, channel, block)"),
    (ct_config({"strategy": "channel", "num_bits": 4, "type": "int"}), "4-bit int is not supported "
                                                                       "(supported: 8-bit float"),
    (ct_config({"strategy": "channel", "symmetric": False}), "asymmetric FP8 is not supported"),
    ({**ct_config({"strategy": "channel"}), "format": "nvfp4-pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}}},
     "format 'nvfp4-pack-quantized' (group g) is not supported (supported: float-quantized, pack-quantized)"),
])
def test_unsupported_methods_and_schemes_are_named_with_the_supported_ones(qc, text):
    with pytest.raises(ConfigError) as err:
        quant_config({"quantization_config": qc})
    assert text in str(err.value)


def test_online_quantization_of_a_quantized_checkpoint_is_refused():
    with pytest.raises(ConfigError, match=r"--quantize fp8 applies to unquantized checkpoints; this one is already "
                                          r"quantized \('fp8'\)"):
        quant_config({"quantization_config": BLOCK_FP8}, quantize="fp8")


def test_fused_parts_quantized_differently_are_refused():
    q = quant_config({"quantization_config": {**BLOCK_FP8, "modules_to_not_convert": ["self_attn.k_proj"]}})
    with pytest.raises(ConfigError, match="parts of the fused layer m.qkv_proj are quantized differently"):
        q.method_for("m.qkv_proj", ["m.self_attn.q_proj", "m.self_attn.k_proj", "m.self_attn.v_proj"])


def test_load_config_rejects_unknown_options():
    with pytest.raises(ConfigError, match="quantize 'int4' is not supported"):
        LoadConfig(quantize="int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype 'fp16' is not supported"):
        LoadConfig(kv_cache_dtype="fp16")


# ------------------------------------------------------------------------- declared scale specs


def _declare(layer, attr: str, method: SerializedFP8, path="m"):
    spec = next(s for s in layer.unquantized_specs(path) if s.name == f"{path}.{attr}")
    return {d.attr: d.spec for d in method.declare(attr, WeightGeometry.of(spec), torch.float32)}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_block_scales_of_a_fused_column_layer_tile_on_every_tp_rank(tp):
    # q: 128 rows (8 blocks), k/v: 32 rows (2 blocks) -- replicated over TP ranks when tp > 2
    kv = min(tp, 2)
    layer = ColumnParallelLinear(40, [Part(name="q_proj", out_features=128, num_shards=tp),
                                      Part(name="k_proj", out_features=32, num_shards=kv),
                                      Part(name="v_proj", out_features=32, num_shards=kv)], tp=tp, device="meta")
    specs = _declare(layer, "weight", SerializedFP8(strategy="block", block=(16, 16), scale_suffix="weight_scale_inv"))
    scale = specs["weight_scale_inv"]
    assert scale.shape == (8 // tp + 2 * (2 // kv), 3)  # 40 columns: 2 whole blocks and a partial one
    assert [s.name for s in scale.sources] == [f"{p}.weight_scale_inv" for p in ("q_proj", "k_proj", "v_proj")]
    assert [s.shape for s in scale.sources] == [(8, 3), (2, 3), (2, 3)]
    check_tiling(scale, tp, range(tp))


def test_block_scales_of_a_row_parallel_layer_split_by_columns():
    layer = RowParallelLinear(64, 40, tp=4, device="meta")
    scale = _declare(layer, "weight", SerializedFP8(strategy="block", block=(16, 16),
                                                     scale_suffix="weight_scale_inv"))["weight_scale_inv"]
    assert scale.shape == (3, 1) and scale.sources[0].shape == (3, 4) and scale.sources[0].shard.dim == 1
    check_tiling(scale, 4, range(4))


def test_channel_scales_follow_rows_and_stay_whole_for_row_parallel_layers():
    column = ColumnParallelLinear(64, [Part(name="gate_proj", out_features=96, num_shards=2),
                                       Part(name="up_proj", out_features=96, num_shards=2)], tp=2, device="meta")
    scale = _declare(column, "weight", SerializedFP8(strategy="channel"))["weight_scale"]
    assert scale.shape == (96, 1) and [s.offset for s in scale.sources] == [0, 48]
    row = _declare(RowParallelLinear(64, 32, tp=2, device="meta"), "weight", SerializedFP8(strategy="channel"))
    assert row["weight_scale"].shape == (32, 1) and row["weight_scale"].sources[0].shard.dim is None


def test_tensor_scales_and_input_scales_hold_one_value_per_fused_part():
    layer = ColumnParallelLinear(64, [Part(name="q_proj", out_features=64, num_shards=2),
                                      Part(name="k_proj", out_features=32, num_shards=2),
                                      Part(name="v_proj", out_features=32, num_shards=2)], tp=2, device="meta")
    specs = _declare(layer, "weight", SerializedFP8(strategy="tensor", static_input=True))
    for attr in ("weight_scale", "input_scale"):
        assert specs[attr].shape == (3,) and specs[attr].role is Role.REQUIRED
        assert [(s.shape, s.offset) for s in specs[attr].sources] == [((1,), 0), ((1,), 1), ((1,), 2)]
        check_tiling(specs[attr], 2, range(2))


def test_expert_scales_follow_the_expert_tp_split():
    placement = ExpertPlacement.make(num_experts=4, ep=1, kind="linear")
    experts = FusedExperts(64, 32, placement, group=0, etp=2, device="meta",
                           names=("experts.{expert}.gate_proj", "experts.{expert}.up_proj", "experts.{expert}.down_proj"))
    method = SerializedFP8(strategy="block", block=(16, 16), scale_suffix="weight_scale_inv")
    w13 = _declare(experts, "w13", method, path="mlp.experts")["w13_weight_scale_inv"]
    w2 = _declare(experts, "w2", method, path="mlp.experts")["w2_weight_scale_inv"]
    assert w13.name == "mlp.experts.w13_weight_scale_inv" and w13.shape == (4, 2, 4)
    assert [p.name for p in w13.experts.parts] == ["mlp.experts.{expert}.gate_proj.weight_scale_inv",
                                                   "mlp.experts.{expert}.up_proj.weight_scale_inv"]
    assert w2.shape == (4, 4, 1) and w2.experts.parts[0].shard.dim == 1


def test_a_tp_shard_that_cuts_a_block_is_refused_naming_the_tensor():
    layer = ColumnParallelLinear(64, [Part(name="gate_proj", out_features=96, num_shards=4)], tp=4, device="meta")
    with pytest.raises(PlanError) as err:
        _declare(layer, "weight", SerializedFP8(strategy="block", block=(16, 16), scale_suffix="weight_scale_inv"))
    assert "a TP shard of 24 rows cuts a scale block of 16" in str(err.value)
    assert err.value.tensor == "gate_proj.weight"


# ------------------------------------------------------------------ plans from real FP8 headers


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8moe")
    spec = HFSpec(model_type="qwen3_moe", num_hidden_layers=2, seed=5,
                  extra={"num_experts": 64, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                         "norm_topk_prob": True})
    src = write_hf_checkpoint(str(root / "f32"), spec)
    return write_block_fp8_checkpoint(src, str(root / "fp8"))


@pytest.mark.parametrize("world, tp, pp, ep, placement", [(16, 2, 1, 8, "linear"), (64, 2, 1, 64, "round_robin"),
                                                         (256, 2, 2, 64, "linear"), (512, 4, 2, 64, "linear")])
def test_every_scale_unit_is_owned_by_exactly_the_owners_of_its_weight(fp8_moe, world, tp, pp, ep, placement):
    config = LoadConfig(tp=tp, pp=pp, ep=ep, expert_placement=placement)
    layout = Layout.for_world(world, tp=tp, pp=pp, ep=ep)
    *_, plan = prepare(fp8_moe, config, layout, reference_model, rank=0, ops=Collectives(None, tp),
                       stage_ops=Collectives(None, world // pp))
    scales = [i for i, u in enumerate(plan.units) if u.name.endswith("weight_scale_inv")]
    # per layer: 64 experts x 3 matrices and 4 attention projections
    assert len({plan.units[i].name for i in scales}) == 2 * (3 * 64 + 4)
    for i in scales:
        u = plan.units[i]
        weight = plan.unit_ids[(u.name.replace("weight_scale_inv", "weight"), None, u.index)]
        assert plan.owners(i) == plan.owners(weight), u.name
    report = dry_run(fp8_moe, config, world_size=world)
    assert report.complete and not report.unexpected and sum(r.num_ranks for r in report.ranks) == world


def test_a_non_local_experts_scale_is_never_read_by_a_rank_that_does_not_host_it(fp8_moe):
    world, ep = 8, 8
    name = "model.layers.1.mlp.experts.45.down_proj.weight_scale_inv"
    readers = []
    for rank in range(world):
        *_, plan = prepare(fp8_moe, LoadConfig(ep=ep), Layout.for_world(world, ep=ep), reference_model, rank=rank,
                           ops=Collectives(None, 1), stage_ops=Collectives(None, world))
        if name in {r.tensor.name for r in plan.for_rank(rank).reads}:
            readers.append(rank)
    assert readers == [5]  # 64 experts over 8 groups, linear: experts 40-47 on rank 5 only


# ------------------------------------------------------- checkpoint dtypes against the config


def _fp8_llama(root) -> str:
    src = write_hf_checkpoint(str(root / "f32"), HFSpec(model_type="llama", intermediate_size=128))
    return write_block_fp8_checkpoint(src, str(root / "fp8"))


def test_a_layer_the_config_quantizes_whose_weight_is_not_fp8_is_refused(tmp_path):
    directory = _fp8_llama(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    plain = read_tensors(str(tmp_path / "f32"))[name]
    put_tensors(directory, {name: plain})
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=2)
    assert "the quantization config makes this layer FP8, but the checkpoint stores its weight as float32" \
        in str(err.value)
    assert err.value.tensor == name and err.value.file.endswith(".safetensors")


def test_an_fp8_weight_of_a_layer_the_config_leaves_unquantized_is_refused(tmp_path):
    directory = _fp8_llama(tmp_path)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"]["modules_to_not_convert"] = ["lm_head", "model.layers.0.self_attn.o_proj"]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=1)
    assert re.search(r"stores this tensor as float8_e4m3fn, but its layer is left unquantized \(parameter "
                     r"model.layers.0.self_attn.o_proj.weight\) by quantization_config's ignore list", str(err.value))
    assert err.value.tensor == "model.layers.0.self_attn.o_proj.weight"


def test_unknown_quant_method_fails_the_load_naming_config_json(tmp_path):
    directory = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError) as err:
        distload.load(directory, LoadConfig(device="cpu"))
    assert "quant_method 'awq' is not supported (supported: fp8, compressed-tensors" in str(err.value)
    assert err.value.file == path


@pytest.mark.parametrize("world, tp, pp, ep, redundant", [(16, 2, 1, 8, 0), (32, 2, 2, 8, 8), (8, 4, 2, 1, 0)])
def test_the_dry_run_summary_of_every_rank_equals_its_planned_reads(fp8_moe, tmp_path, world, tp, pp, ep, redundant):
    directory = copy_checkpoint(fp8_moe, str(tmp_path / "ckpt"))
    from tests.hf_checkpoints import delete_tensors
    delete_tensors(directory, ["model.layers.1.mlp.experts.9.up_proj.weight_scale_inv",
                               "model.layers.0.self_attn.q_proj.weight"])
    config = LoadConfig(tp=tp, pp=pp, ep=ep, redundant_experts=redundant)
    layout = Layout.for_world(world, tp=tp, pp=pp, ep=ep)
    *_, plan = prepare(directory, config, layout, reference_model, rank=0, ops=Collectives(None, tp),
                       stage_ops=Collectives(None, world // pp))
    for rank in range(world):
        rp, s = plan.for_rank(rank), plan.summary(rank)
        present = {r.unit for r in rp.reads}
        assert (s.units_present, s.units_owned, s.nbytes, s.files) == \
               (len(present), len(set(rp.owned)), rp.nbytes, len(rp.files)), rank


def test_two_groups_with_the_same_scheme_are_one_scheme():
    qc = ct_config({"strategy": "channel"})
    group = qc["config_groups"]["group_0"]
    qc["config_groups"] = {"group_0": {**group, "targets": ["re:.*q_proj$", "re:.*k_proj$"]},
                           "group_1": {**group, "targets": ["re:.*v_proj$", "re:.*o_proj$"]}}
    q = quant_config({"quantization_config": qc})
    method = q.method_for("m.qkv_proj", ["m.q_proj", "m.k_proj", "m.v_proj"])
    assert method is not None and method.strategy == "channel"


def test_fp8_ignore_entries_match_whole_dotted_components():
    q = quant_config({"quantization_config": {**BLOCK_FP8,
                                              "modules_to_not_convert": ["lm_head", "model.layers.1", "mlp.gate"]}})
    assert q.method_for("x", ["model.layers.1.self_attn.q_proj"]) is None
    assert q.method_for("x", ["model.layers.12.self_attn.q_proj"]) is not None
    assert q.method_for("x", ["model.layers.3.mlp.gate"]) is None
    assert q.method_for("x", ["model.layers.3.mlp.gate_proj"]) is not None
    with pytest.raises(ConfigError, match="modules_to_not_convert must be a list of module names, got 'lm_head'"):
        quant_config({"quantization_config": {**BLOCK_FP8, "modules_to_not_convert": "lm_head"}})
    with pytest.raises(ConfigError, match=r"group_0 weights: None-bit float is not supported"):
        quant_config({"quantization_config": ct_config({"strategy": "channel", "num_bits": None})})


def test_an_e5m2_weight_is_refused_not_cast(tmp_path):
    directory = _fp8_llama(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    put_tensors(directory, {name: read_tensors(directory)[name].float().to(torch.float8_e5m2)})
    with pytest.raises(PlanError) as err:
        dry_run(directory, LoadConfig(), world_size=1)
    assert "stores this weight as float8_e5m2; the FP8 schemes read float8_e4m3fn only" in str(err.value)
    assert err.value.tensor == name


def test_the_model_dtype_of_an_fp8_checkpoint_is_that_of_most_bytes():
    from types import SimpleNamespace

    from distload.prepare import checkpoint_dtype
    from distload.checkpoint.header import TensorInfo

    def info(name, dtype, n):
        return TensorInfo(name=name, file="f", dtype=dtype, shape=(n,), begin=0, end=n * dtype.itemsize)

    tensors = {"embed": info("embed", torch.bfloat16, 4096), "w": info("w", torch.float8_e4m3fn, 65536)}
    tensors.update({f"s{i}": info(f"s{i}", torch.float32, 4) for i in range(20)})  # many small scales
    assert checkpoint_dtype(SimpleNamespace(config={}, tensors=tensors)) == torch.bfloat16


def test_a_derived_parameter_nothing_computes_is_refused():
    from torch import nn

    from distload.spec import ParamSpec, PostLoad, SpecProvider, collect_specs

    class Forgetful(nn.Module, SpecProvider, PostLoad):
        """Declares a derived scale, but its post-load step computes nothing."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(1, device="meta"))

        def param_specs(self, path):
            yield ParamSpec(name=f"{path}.scale", shape=(1,), role=Role.DERIVED, derived_from=("w",))

    with pytest.raises(PlanError, match="derived parameter m.scale shares no storage with a loaded parameter and its "
                                        "module computes nothing after loading"):
        collect_specs(nn.ModuleDict({"m": Forgetful()}))
