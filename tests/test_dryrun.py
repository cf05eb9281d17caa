"""--dry-run plans every rank from the headers alone and finds what a real load would."""

import json
import subprocess
import sys

import distload
from distload.dryrun import dry_run
from tests import jobs
from tests.hf_checkpoints import copy_checkpoint, delete_tensors, put_tensors


def _strip(report: dict) -> dict:
    return {k: report[k] for k in ("complete", "layout", "missing", "inconsistent", "unexpected", "defaulted",
                                   "num_units")}


def test_dry_run_equals_the_real_load_at_world_8(pool, tmp_path):
    import torch
    directory = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    delete_tensors(directory, ["model.layers.1.self_attn.v_proj.weight", "model.norm.weight"])
    put_tensors(directory, {"model.stray": torch.zeros(2)})
    real = pool.run(8, jobs.load_outcome, directory, 2)[0]["report"]
    planned = dry_run(directory, distload.LoadConfig(tp=2), world_size=8).to_json()
    assert planned["mode"] == "dry-run" and real["mode"] == "load"
    assert _strip(planned) == _strip(real)
    assert [m["name"] for m in planned["missing"]] == ["model.layers.1.self_attn.v_proj.weight", "model.norm.weight"]
    # one planned row per TP index, standing for its 4 replicas; every real rank reads as its row says
    classes = {c["tp"]: c for c in planned["rank_classes"]}
    assert [(c["rank"], c["num_ranks"]) for c in planned["rank_classes"]] == [(0, 4), (1, 4)]
    for r in real["ranks"]:
        p = classes[r["rank"] % 2]
        assert {k: p[k] for k in ("bytes_read", "units_loaded", "units_owned", "files_opened")} == \
               {k: r[k] for k in ("bytes_read", "units_loaded", "units_owned", "files_opened")}
    assert planned["bytes_read"] == real["bytes_read"]


def test_dry_run_at_4096_ranks_from_the_cli(tmp_path):
    directory = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    ok = subprocess.run([sys.executable, "-m", "distload", directory, "--dry-run", "--world", "4096", "--tp", "4",
                         "--json", "ok.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["mode"] == "dry-run" and report["complete"] is True and "ranks" not in report
    assert [(c["rank"], c["num_ranks"], c["tp"]) for c in report["rank_classes"]] == [(t, 1024, t) for t in range(4)]
    assert "bytes per rank" in ok.stdout and "files per rank" in ok.stdout

    delete_tensors(directory, ["model.layers.0.mlp.up_proj.weight"])
    bad = subprocess.run([sys.executable, "-m", "distload", directory, "--dry-run", "--world", "4096", "--tp", "4",
                          "--json", "bad.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 3
    missing = json.loads((tmp_path / "bad.json").read_text())["missing"]
    assert [m["name"] for m in missing] == ["model.layers.0.mlp.up_proj.weight"]
    assert missing[0]["owners"] == list(range(4096))  # every rank holds its quarter of up_proj
