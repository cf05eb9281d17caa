"""The CLI speaks the engines' flags too: aliases, the extra-config JSON, --version, JSON versions."""

from __future__ import annotations

import json
import re

import pytest

import distload
from distload import __main__ as cli_main
from distload.config import LoadConfig
from tests.hf_checkpoints import HFSpec, write_hf_checkpoint


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def dry_run_json(tmp_path, capsys, *args: str) -> dict:
    path = tmp_path / "r.json"
    code = cli_main.main([*args, "--dry-run", "--json", str(path)])
    capsys.readouterr()
    assert code == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("engine,short", [
    (["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], ["--tp", "2", "--pp", "2"]),
    (["-tp", "2", "-dp", "2"], ["--tp", "2", "--dp", "2"]),
    (["-pp", "2", "-tp", "2"], ["--pp", "2", "--tp", "2"]),
    (["--data-parallel-size", "4", "--dtype", "auto"], ["--dp", "4"]),
])
def test_engine_aliases_mean_the_short_options(tmp_path, capsys, engine, short):
    a = dry_run_json(tmp_path, capsys, *engine, "--world", "4")
    b = dry_run_json(tmp_path, capsys, *short, "--world", "4")
    assert a["layout"] == b["layout"] and a["rank_classes"] == b["rank_classes"]


def test_dtype_auto_keeps_the_checkpoints_dtype_on_a_real_load(tmp_path, capsys):
    import torch

    from distload.options import parse

    ckpt = write_hf_checkpoint(str(tmp_path / "fp16"), HFSpec(model_type="llama", dtype="float16"))
    loaded = distload.load(ckpt, parse([ckpt, "--device", "cpu", "--dtype", "auto"]).config)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16} and loaded.report.notes == ()
    auto, cast = tmp_path / "auto.json", tmp_path / "cast.json"  # the CLI's own run: nothing cast, unlike float32
    assert cli_main.main([ckpt, "--device", "cpu", "--quiet", "--dtype", "auto", "--json", str(auto)]) == 0
    assert cli_main.main([ckpt, "--device", "cpu", "--quiet", "--dtype", "float32", "--json", str(cast)]) == 0
    capsys.readouterr()
    assert json.loads(auto.read_text())["notes"] == []
    assert any("float16 -> float32" in n for n in json.loads(cast.read_text())["notes"])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    spec = HFSpec(model_type="qwen3_moe", extra={"num_experts": 8, "num_experts_per_tok": 2,
                                                 "moe_intermediate_size": 32, "decoder_sparse_step": 1})
    return write_hf_checkpoint(str(tmp_path_factory.mktemp("moe")), spec)


def test_enable_expert_parallel_splits_experts_over_the_stage(tmp_path, capsys, moe):
    report = dry_run_json(tmp_path, capsys, moe, "--world", "4", "-tp", "2", "--enable-expert-parallel")
    assert report["layout"] == {"world_size": 4, "tp": 2, "dp": 2, "pp": 1, "ep": 4}
    assert report["layout"] == dry_run_json(tmp_path, capsys, moe, "--world", "4", "--tp", "2", "--ep", "4")["layout"]
    assert LoadConfig(tp=2, expert_parallel=True).layout(8).ep == 8


@pytest.mark.parametrize("args,line", [
    (["--ep", "2", "--enable-expert-parallel"], "--ep and --enable-expert-parallel both set the expert-parallel "
                                                 "size; give one"),
    (["--model-loader-extra-config", '{"num_read_threads": 0}'], "num_read_threads must be a positive integer, got 0"),
    (["--model-loader-extra-config", '{"threads": 2}'], "unknown loader extra-config key 'threads'; allowed keys: "
                                                        "enable_weights_track, huge_pages, num_read_threads, readahead, "
                                                        "staging_mib, verify_checksums"),
    (["--model-loader-extra-config", "[1]"], "--model-loader-extra-config must be a JSON object, got '[1]'"),
    (["--model-loader-extra-config", '{"staging_mib": 8}', "--staging-mib", "8"],
     "--staging-mib and --model-loader-extra-config both set staging_mib; give it once"),
])
def test_engine_flag_misuse_exits_2(capsys, args, line):
    assert cli_main.main(["--device", "cpu", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"distload: error: {line}"]


def test_the_extra_config_json_reaches_the_load(monkeypatch):
    from distload import api
    seen = {}

    def fake_load(directory, config, **_):
        seen.update(config.extra_config)
        raise distload.DistloadError("stop here")

    monkeypatch.setattr(api, "load", fake_load)
    extra = '{"num_read_threads": 3, "enable_weights_track": false}'
    assert cli_main.main(["--device", "cpu", "--quiet", "--model-loader-extra-config", extra,
                          "--staging-mib", "64"]) == 1
    assert seen == {"num_read_threads": 3, "enable_weights_track": False, "staging_mib": 64}


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"distload {distload.__version__}\n"


def test_json_carries_its_schema_and_distload_versions(tmp_path, capsys):
    from distload.report import SCHEMA_VERSION
    report = dry_run_json(tmp_path, capsys)
    assert report["schema_version"] == SCHEMA_VERSION == 3 and report["distload_version"] == distload.__version__


def _readme_keys() -> set[str]:
    import os
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    table = readme.split("### The JSON report", 1)[1].split("\n\n| key | meaning |", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))


def test_the_readme_documents_every_json_key_and_no_other(tmp_path, capsys):
    load = tmp_path / "load.json"
    assert cli_main.main(["--device", "cpu", "--quiet", "--json", str(load)]) == 0
    failed = tmp_path / "failed.json"
    assert cli_main.main([str(tmp_path / "nowhere"), "--device", "cpu", "--json", str(failed)]) == 1
    capsys.readouterr()
    keys = set(json.loads(load.read_text())) | set(dry_run_json(tmp_path, capsys)) | set(json.loads(failed.read_text()))
    assert _readme_keys() == keys


def test_the_human_report_names_owner_ranks_ignored_names_and_its_two_times(tmp_path, capsys):
    import torch
    from tests.hf_checkpoints import copy_checkpoint, delete_tensors, put_tensors
    ckpt = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    delete_tensors(ckpt, ["model.norm.weight"])
    put_tensors(ckpt, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    assert cli_main.main([ckpt, "--device", "cpu", "--quiet"]) == 3
    text = capsys.readouterr().out
    assert "    model.norm.weight  (owner ranks 0)" in text
    assert "  ignored (1), by an ignore rule:\n    model.layers.0.self_attn.rotary_emb.inv_freq" in text
    assert re.search(r"; load took \d+\.\d\d s on rank 0 \(wall time\), the slowest rank's read step \d+\.\d\d s",
                     text)
