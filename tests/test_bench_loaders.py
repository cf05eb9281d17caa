"""The load benchmark's baselines are real: every CPU loader of benchmarks/loaders.py fills
parameters equal to the checkpoint (all slices compared), at world sizes 1 and 2; a wrong
slice is caught; the synthetic presets match distload's models at full size; and the
cold-cache helper's mincore reports page-cache residency correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import page_cache, synth_checkpoints
from benchmarks.bench_ctx import Ctx, verify_params
from distload.execute import destination
from benchmarks.load_worker import pool_job
from benchmarks.loaders import run_engine, unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_LOADERS = ["distload", "eager", "load_file", "engine", "fastsafetensors", "floor", "floor_fresh"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def tiny(bench_dir):
    return synth_checkpoints.ensure_checkpoint("tiny", str(bench_dir / "tiny"))


@pytest.fixture(scope="module")
def moe_tiny(bench_dir):
    return synth_checkpoints.ensure_checkpoint("qwen3moe-tiny", str(bench_dir / "qwen3moe-tiny"))


def _check_ranks(out: list[dict], total: int | None = None) -> None:
    for r in out:
        assert "error" not in r, r
        assert r["check"]["ok"], r["check"]
        assert r["check"]["checked"] > 0
        assert r["t1"] >= r["t0"] and r["cpu_seconds"] >= 0
    if total is not None:  # at TP 1 a rank needs every byte of the checkpoint once
        assert out[0]["planned_bytes"] == total


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("loader", CPU_LOADERS)
def test_loader_fills_every_slice(pool, tiny, loader, world):
    why = unavailable(loader, "cpu")
    if why:
        pytest.skip(why)
    out = pool.run(world, pool_job, tiny, loader, world, 1, None, timeout=120)
    total = synth_checkpoints.weight_files(tiny)
    _check_ranks(out, sum(os.path.getsize(f) for f in total) - _header_bytes(total) if world == 1 else None)


@pytest.mark.parametrize("loader", ["distload", "engine", "floor", "fastsafetensors"])
def test_moe_loader_fills_every_slice(pool, moe_tiny, loader):
    why = unavailable(loader, "cpu")
    if why:
        pytest.skip(why)
    _check_ranks(pool.run(2, pool_job, moe_tiny, loader, 2, 1, None, timeout=120))


def test_the_verify_loader_hashes_every_file_against_the_manifest_the_command_wrote(pool, tiny, tmp_path):
    import shutil
    from benchmarks import load_bench
    copy = shutil.copytree(tiny, str(tmp_path / "tiny"), copy_function=os.link)  # as benchmarks/README says
    before = set(os.listdir(copy))
    load_bench.write_manifest(copy)  # python -m distload.manifest, the only writer into the folder
    assert set(os.listdir(copy)) - before == {"distload-manifest.json"}
    out = pool.run(2, pool_job, copy, "distload_verify", 2, 1, None, timeout=120)
    _check_ranks(out)
    hashed = [*synth_checkpoints.weight_files(copy), *(os.path.join(copy, n) for n in
                                                         ("config.json", "model.safetensors.index.json"))]
    assert out[0]["stats"]["bytes_hashed"] == sum(map(os.path.getsize, hashed)) and out[0]["stats"]["complete"] is True
    assert out[0]["stats"]["report"]["verification"]["ok"]


def test_a_wrong_slice_is_caught(tiny):
    ctx = Ctx(directory=tiny, rank=0, world=1, local_rank=0, local_world=1, tp=1, dp=1, device=torch.device("cpu"))
    ctx.prepare()
    run_engine(ctx)
    assert verify_params(ctx, None)["ok"]
    read = next(r for r in ctx.reads() if r.tensor.name.endswith("o_proj.weight"))
    with torch.no_grad():
        destination(ctx.params, read)[0, 0] += 1
    bad = verify_params(ctx, None)
    assert not bad["ok"] and any("o_proj" in b for b in bad["bad"])


@pytest.mark.parametrize("preset,tp,ep", [("llama8b-7g", 8, 1), ("llama8b-30g", 8, 1), ("qwen3moe-small", 8, 1),
                                         ("qwen3moe-small", 2, 8)])
def test_full_size_presets_plan_complete(tmp_path, preset, tp, ep):
    import distload
    from distload.dryrun import dry_run
    spec = synth_checkpoints.PRESETS[preset]
    info = synth_checkpoints.write_headers_only(str(tmp_path), spec["config"], spec["max_shard_size"])
    report = dry_run(str(tmp_path), distload.LoadConfig(tp=tp, ep=ep), world_size=8).to_json()
    assert report["complete"] and not report["unexpected"] and not report["missing"]
    if preset == "llama8b-7g":  # the Llama-3-8B shape at 12 layers: 7.34 GB in 3 files at 3 GB
        assert len(info["files"]) == 3 and round(info["total_size"] / 1e9, 2) == 7.34
    if preset == "llama8b-30g":  # 64 layers: 30.02 GB in 2 GB files (scripts/multigpu)
        assert len(info["files"]) == 16 and round(info["total_size"] / 1e9, 2) == 30.02


def test_mincore_reports_residency(tmp_path):
    path = str(tmp_path / "data.bin")
    pages = 2048
    with open(path, "wb") as f:
        f.write(os.urandom(4096) * pages)
        f.flush()
        os.fsync(f.fileno())
    assert page_cache.resident_fraction([path]) > 0.99  # just written: in the page cache
    state = page_cache.make_cold([path])
    after = page_cache.resident_fraction([path])
    assert state["cold"] == (after < page_cache.COLD_LIMIT)
    if not state["cold"]:
        pytest.skip(f"this filesystem keeps evicted pages ({after:.0%} resident): cold runs are not measurable here")
    with open(path, "rb") as f:  # a quarter of the file (plus the kernel's readahead) comes back
        f.read(pages // 4 * 4096)
    assert 0.24 < page_cache.resident_fraction([path]) < 0.75


def test_runner_writes_results(tiny, tmp_path):
    from benchmarks import load_bench
    out = tmp_path / "r.json"
    load_bench.main(["--dir", tiny, "--preset", "tiny", "--worlds", "1", "--loaders", "distload,floor,instanttensor",
                     "--runs", "1", "--check", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    summary = result["summary"]["1"]
    assert set(summary) == {"distload", "floor"} and summary["floor"]["vs_floor"] == 1.0
    assert all(s["all_checks_ok"] for s in summary.values())
    assert result["not_run"]["instanttensor"].startswith("not run: ")
    run = next(r for r in result["runs"] if r["loader"] == "distload")
    assert run["distload_report"]["complete"] is True and run["needed_bytes"] == run["unique_bytes"]


def _header_bytes(files: list[str]) -> int:
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def _multigpu(*args: str, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "multigpu"), *args], env=env, capture_output=True,
                          text=True, timeout=150)


def test_multigpu_script_without_its_gpus_stops_at_once_naming_them(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs: the script would run")
    done = _multigpu("2", "tests", out=tmp_path / "out")
    assert done.returncode == 3, done
    assert done.stderr.strip().splitlines()[-1] == \
        f"scripts/multigpu: needs 2 CUDA devices, {torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES=0,1)"
    assert not (tmp_path / "out").exists()  # nothing was started or written
    for bad in (["3"], ["2", "everything"], []):
        wrong = _multigpu(*bad, out=tmp_path / "out")
        assert wrong.returncode == 2 and wrong.stderr.strip() == "usage: scripts/multigpu 1|2|4|8 [tests|bench|all]"
