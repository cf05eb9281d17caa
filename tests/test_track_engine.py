"""``distload.track`` on an engine's own load: the engine-style model of ``tests.engine_loader``
(vLLM's loading protocol: weight_loader(param, tensor[, shard_id][, expert_id]), stacked and expert
mappings, a per-layer expert map with redundant copies, pipeline-missing parameters, FP8
parameters) loads checkpoints written by transformers, on gloo ranks; its merged report must name
exactly what ``distload.load`` names for the same checkpoint, deletion and layout, with the same
owners and ``loaded_by``, and nothing on intact checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests import track_jobs
from tests.ct_checkpoints import write_ct_checkpoint
from tests.fp8_checkpoints import write_block_fp8_checkpoint
from tests.hf_checkpoints import DEEPSEEK_V3, QWEN3_MOE, HFSpec, copy_checkpoint, delete_tensors, \
    write_hf_checkpoint

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SPECS = {
    "llama": HFSpec(model_type="llama", intermediate_size=128, extra={"attention_bias": True}, seed=3),
    "qwen3_moe": QWEN3_MOE,
    "deepseek_v3": DEEPSEEK_V3,
}
KINDS = ("missing", "inconsistent", "defaulted", "unexpected")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("track-engine")
    made = {name: write_hf_checkpoint(str(root / name), spec) for name, spec in SPECS.items()}
    made["llama_fp8"] = write_block_fp8_checkpoint(made["llama"], str(root / "llama_fp8"))
    made["moe_fp8"] = write_block_fp8_checkpoint(made["qwen3_moe"], str(root / "moe_fp8"))
    made["ct_static_kv"] = write_ct_checkpoint(str(root / "ct"), HFSpec(model_type="llama"), strategy="tensor",
                                               static_input=True, kv_cache=True)
    return made


@dataclass(frozen=True)
class Case:
    ckpt: str
    layout: dict
    delete: tuple[str, ...] = ()
    skip: dict = field(default_factory=dict)
    redundant: int = 0
    slow: bool = False

    @property
    def world(self) -> int:
        return self.layout.get("tp", 1) * self.layout.get("dp", 1) * self.layout.get("pp", 1)

    @property
    def id(self) -> str:
        what = self.delete[0].split(".", 2)[-1] if self.delete else ("skip" if self.skip else "intact")
        lay = "-".join(f"{k}{v}" for k, v in self.layout.items())
        return f"{self.ckpt}-w{self.world}-{lay}{f'-r{self.redundant}' if self.redundant else ''}-{what}"


CASES = [
    Case("llama", {"tp": 1}),
    Case("llama", {"tp": 2}, delete=("model.layers.1.self_attn.q_proj.weight",)),  # q of a stacked qkv
    Case("llama", {"tp": 2, "pp": 2}, delete=("model.layers.1.self_attn.q_proj.weight",)),
    Case("llama", {"tp": 2, "dp": 2, "pp": 2}, skip={5: ("model.norm.weight",)}, slow=True),
    Case("qwen3_moe", {"dp": 4, "ep": 4}, delete=("model.layers.2.mlp.experts.5.up_proj.weight",)),  # one expert's up
    Case("qwen3_moe", {"tp": 2, "pp": 2}, delete=("model.layers.2.mlp.experts.5.up_proj.weight",)),
    Case("qwen3_moe", {"tp": 2}, skip={1: ("model.layers.0.mlp.gate.weight",)}),
    Case("qwen3_moe", {"tp": 2, "dp": 4, "ep": 4}, redundant=4,  # expert 1 also in slot 9, on group 3
         delete=("model.layers.0.mlp.experts.1.up_proj.weight",), slow=True),
    Case("moe_fp8", {"dp": 4, "ep": 4}, delete=("model.layers.2.mlp.experts.5.down_proj.weight_scale_inv",)),
    Case("moe_fp8", {"dp": 2, "ep": 2}, redundant=2),
    Case("llama_fp8", {"tp": 2}, delete=("model.layers.1.self_attn.k_proj.bias",)),  # a bias of an FP8 layer
    Case("ct_static_kv", {"tp": 2}, delete=("model.layers.0.self_attn.k_scale",)),  # a KV scale: defaulted
    Case("ct_static_kv", {"tp": 2}, delete=("model.layers.1.self_attn.v_proj.input_scale",)),
    Case("deepseek_v3", {"tp": 2}, delete=("model.layers.0.self_attn.kv_a_layernorm.weight",)),
    Case("deepseek_v3", {"dp": 2, "pp": 2, "ep": 2}, delete=("model.layers.1.mlp.experts.3.gate_proj.weight",)),
    Case("deepseek_v3", {"tp": 2, "dp": 4, "ep": 4}, slow=True),
]


def by_name(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: e["name"])


def same_everywhere(results: list) -> dict:
    assert not any(isinstance(r, BaseException) for r in results), results
    first = results[0]["report"]
    for r in results[1:]:
        assert {k: r["report"][k] for k in KINDS} == {k: first[k] for k in KINDS}
    return first


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_track_names_what_load_names(pool, ckpts, tmp_path, case):
    directory = ckpts[case.ckpt]
    if case.delete:
        directory = copy_checkpoint(directory, str(tmp_path / case.ckpt))
        delete_tensors(directory, list(case.delete))
    tracked = same_everywhere(pool.run(case.world, track_jobs.engine_track, directory, case.layout, case.skip,
                                       case.redundant))
    loaded = same_everywhere(pool.run(case.world, track_jobs.distload_report, directory, case.layout, case.skip,
                                      case.redundant))
    for kind in KINDS:
        assert by_name(tracked[kind]) == by_name(loaded[kind]), kind
    assert tracked["complete"] == loaded["complete"] and tracked["ok"] == loaded["ok"]
    named = {e["name"] for kind in KINDS for e in tracked[kind]}
    assert named == set(case.delete) | {n for names in case.skip.values() for n in names}


def test_vllms_own_check_passes_where_track_names_the_missing_q(pool, ckpts, tmp_path):
    """vLLM's per-rank check (every parameter in the set load_weights returned) is satisfied by a
    qkv_proj whose k and v arrived; the merge names the q that did not, with its owners."""
    directory = copy_checkpoint(ckpts["llama"], str(tmp_path / "no-q"))
    q = "model.layers.0.self_attn.q_proj.weight"
    delete_tensors(directory, [q])
    results = pool.run(2, track_jobs.engine_track, directory, {"tp": 2})
    for r in results:
        assert "model.layers.0.self_attn.qkv_proj.weight" in r["returned"]
    report = same_everywhere(results)
    assert report["missing"] == [{"name": q, "owners": [0, 1]}] and not report["ok"]
    assert results[0]["text"].splitlines()[0].startswith("distload track: INCOMPLETE")


def test_enable_weights_track_false_merges_nothing(pool, ckpts, tmp_path):
    directory = copy_checkpoint(ckpts["llama"], str(tmp_path / "off"))
    delete_tensors(directory, ["model.norm.weight"])
    results = pool.run(2, track_jobs.engine_track, directory, {"tp": 2}, None, 0, {"enable_weights_track": False})
    assert all(r["report"]["complete"] is None and r["report"]["tracked"] is False for r in results)
