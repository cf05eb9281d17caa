"""distload.testing, the harness for users' CI: results and tracebacks per rank, timeouts that kill,
no process left behind, fresh processes on request, and the pytest plugin enabled explicitly."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time

import pytest

import distload
from distload.testing import RankFailed, RankPool, RankTimeout, run_ranks
from tests import harness_jobs
from tests.hf_checkpoints import HFSpec, delete_tensors, write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gone(pid: int) -> bool:
    """True when no process ``pid`` exists (a zombie, never reaped, still counts as left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_raising_rank_surfaces_its_traceback(pool):
    with pytest.raises(RankFailed) as info:
        pool.run(2, harness_jobs.raise_on, 1)
    err = info.value
    assert err.rank == 1 and str(err).splitlines()[0] == "rank 1: ValueError: boom on rank 1"
    assert re.search(r'harness_jobs\.py", line \d+, in _explode\n\s+raise ValueError', err.traceback)
    assert err.traceback in str(err) and isinstance(err.__cause__, ValueError)

    results = pool.results(2, harness_jobs.raise_on, 1)
    assert (results[0].ok, results[0].value, results[0].traceback) == (True, 0, "")
    assert not results[1].ok and str(results[1].error) == "boom on rank 1"
    assert results[1].traceback.startswith("Traceback (most recent call last):")
    assert "in _explode" in results[1].traceback


def test_a_distload_error_is_a_value_with_its_traceback(pool):
    out = pool.run(2, harness_jobs.raise_distload_error, 0)
    assert out[1] == 1 and isinstance(out[0], distload.CheckpointError)
    assert str(out[0]) == "injected [file x.safetensors, rank 0]"
    assert "in raise_distload_error" in out[0].__notes__[-1]
    with pytest.raises(distload.CheckpointError):
        pool.run(2, harness_jobs.raise_distload_error, 0, raise_errors=True)


def test_a_hung_rank_is_killed_at_the_timeout_and_replaced(pool):
    pids = [o["pid"] for o in pool.run(2, harness_jobs.identity)]  # started: the clock counts the call only
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        pool.run(2, harness_jobs.hang_on, 1, timeout=2)
    elapsed = time.monotonic() - start
    assert 2 <= elapsed < 6, elapsed  # killed at the timeout (slack for a busy machine)
    hung = pids[1]
    assert str(info.value) == f"rank 1 of 2 did not finish hang_on within 2 s: killed (pid {hung})"
    assert info.value.ranks == (1,) and gone(hung)
    after = pool.run(2, harness_jobs.identity)  # the pool carries on, with a new worker for rank 1
    assert after[0]["pid"] == pids[0] and after[1]["pid"] not in pids


def test_results_of_a_timed_out_call_keep_the_ranks_that_finished(pool):
    results = pool.results(2, harness_jobs.hang_on, 0, timeout=1.5)  # a worker that starts is not timed
    assert isinstance(results[0].error, RankTimeout) and results[0].error.ranks == (0,)
    assert results[1].ok and results[1].value == pool.pids[1]


def test_the_harness_sets_torchrun_variables_and_a_working_group(pool):
    out = pool.run(3, harness_jobs.identity, env={"EXTRA": "x"})
    assert [(o["RANK"], o["WORLD_SIZE"], o["LOCAL_RANK"], o["LOCAL_WORLD_SIZE"], o["EXTRA"]) for o in out] == \
        [(str(r), "3", str(r), "3", "x") for r in range(3)]
    assert pool.run(3, harness_jobs.all_reduce_ranks) == [3, 3, 3]  # a fresh group for this call
    assert pool.run(2, harness_jobs.all_reduce_ranks) == [1, 1]  # and again, at another size
    assert pool.run(1, harness_jobs.identity)[0]["EXTRA"] is None  # env was only for that call


def test_tensors_travel_both_ways_to_every_rank(pool):
    import torch
    t = torch.arange(6.0)
    assert [o.tolist() for o in pool.run(3, harness_jobs.scaled, t)] == [(t * k).tolist() for k in (1, 2, 3)]
    fresh = run_ranks(2, harness_jobs.scaled, t)  # also from workers that end right after answering
    assert [r.value.tolist() for r in fresh] == [t.tolist(), (2 * t).tolist()]


def test_no_process_is_left_after_close_nor_after_a_timeout():
    pool = RankPool(2)
    pids = pool.pids
    assert len(pids) == 2 and [o["pid"] for o in pool.run(2, harness_jobs.identity)] == pids
    with pytest.raises(RankTimeout):
        pool.run(2, harness_jobs.hang_on, 0, timeout=1)
    replaced = pool.pids
    pool.close()
    assert all(gone(pid) for pid in {*pids, *replaced}) and pool.pids == []


def test_a_worker_lost_between_calls_is_replaced():
    import signal
    with RankPool(2) as pool:
        before = [o["pid"] for o in pool.run(2, harness_jobs.identity)]
        os.kill(before[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(pool.pids) == 2 and time.monotonic() < deadline:  # (pids reaps it)
            time.sleep(0.05)
        after = [o["pid"] for o in pool.run(2, harness_jobs.identity)]
        assert after[0] == before[0] and after[1] not in before and gone(before[1])


def test_fresh_processes_per_call_and_none_left():
    pool = RankPool(2, fresh_processes=True)
    assert pool.pids == []  # nothing runs between calls
    first = [o["pid"] for o in pool.run(2, harness_jobs.identity)]
    second = [o["pid"] for o in pool.run(2, harness_jobs.identity)]
    assert not set(first) & set(second) and all(gone(pid) for pid in first + second)
    (result,) = run_ranks(1, harness_jobs.raise_on, 0)  # the one-call form
    assert not result.ok and "in _explode" in result.traceback
    assert isinstance(result.error, ValueError) and "in _explode" in result.error.__notes__[-1]


def test_device_errors_are_config_errors():
    with pytest.raises(distload.ConfigError, match=r"^RankPool device must be one of auto, cpu, cuda, not 'tpu'$"):
        RankPool(2, device="tpu")
    import torch
    if torch.cuda.device_count() < 64:
        with pytest.raises(distload.ConfigError) as info:
            RankPool(64, device="cuda")
        assert str(info.value) == (f"RankPool(device='cuda') of 64 ranks needs 64 visible GPUs, "
                                   f"found {torch.cuda.device_count()}")


def test_auto_takes_gpus_only_when_there_is_one_per_rank():
    import torch
    with RankPool(1, device="auto") as pool:
        assert pool.device == ("cuda" if torch.cuda.device_count() >= 1 else "cpu")
    with RankPool(torch.cuda.device_count() + 1, device="auto") as pool:
        assert pool.device == "cpu"


def _gpus() -> int:
    import torch
    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA devices")
def test_cuda_ranks_get_one_gpu_each_and_nccl():
    with RankPool(2, device="cuda") as pool:
        assert pool.run(2, harness_jobs.cuda_identity) == [(0, 0, "nccl"), (1, 1, "nccl")]
        assert pool.load(distload.example_checkpoint(), distload.LoadConfig(tp=2)).ok


def pytest_run(directory, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pytest`` in its own process, in ``directory`` (its own rootdir, no ini of ours)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                               "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=directory,
                          capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": ROOT, **(env or {})})


USER_TEST = '''
import os

import pytest

import distload


def rank_and_world():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def test_pool_from_the_ini(distload_ranks):
    assert distload_ranks.size == 3
    assert distload_ranks.run(3, rank_and_world) == [(0, 3), (1, 3), (2, 3)]   # a function of this file


def test_example_loads_on_three_replicas(distload_ranks):
    assert distload_ranks.load(distload.example_checkpoint(), distload.LoadConfig(dp=3), world=3).ok


@pytest.mark.distload_gpu(64)
def test_skipped_without_64_gpus(distload_ranks):
    raise AssertionError("ran without 64 GPUs")


def test_a_rank_error_reaches_the_test(distload_ranks):
    with pytest.raises(distload.PlanError, match="num_attention_heads=4 is not divisible by tp=3"):
        distload_ranks.load(distload.example_checkpoint(), distload.LoadConfig(tp=3), world=3)
'''


def test_the_plugin_is_enabled_explicitly_and_reads_its_ini(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\ndistload_ranks = 3\n")
    off = pytest_run(tmp_path, "test_user.py")
    assert off.returncode == 1 and "fixture 'distload_ranks' not found" in off.stdout, off.stdout
    on = pytest_run(tmp_path, "-p", "distload.testing", "test_user.py")
    assert on.returncode == 0 and "3 passed, 1 skipped" in on.stdout, on.stdout + on.stderr


def _readme_test() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r'```python title="test_checkpoint.py"\n(.*?)```', f.read(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_readme_ci_example_runs_on_cpu(tmp_path, monkeypatch):
    """The README's user test, run as its sh line says, on a tiny MoE that fits TP=8, EP=8 (8 heads, 8 experts)."""
    pytest.importorskip("transformers")
    spec = HFSpec(model_type="qwen3_moe", num_attention_heads=8, num_key_value_heads=2, head_dim=8, seed=3,
                  extra={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32})
    ckpt = write_hf_checkpoint(str(tmp_path / "moe"), spec)
    (tmp_path / "test_checkpoint.py").write_text(_readme_test())
    proc = pytest_run(tmp_path, "-p", "distload.testing", "--distload-ranks", "2", "test_checkpoint.py",
                      env={"CHECKPOINT": ckpt})
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr
    # and it fails on a checkpoint that lacks an expert (its dry-run test, run here in-process)
    delete_tensors(ckpt, ["model.layers.1.mlp.experts.3.up_proj.weight"])
    monkeypatch.setenv("CHECKPOINT", ckpt)
    user = {}
    exec(compile(_readme_test(), "test_checkpoint.py", "exec"), user)
    with pytest.raises(AssertionError, match=r"missing.*\n.*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        user["test_loads_completely_at_tp8_ep8"]()


def test_a_function_that_cannot_be_imported_fails_in_every_rank_with_its_reason(pool, tmp_path):
    module = tmp_path / "only_here.py"
    module.write_text("def job():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here
        results = pool.results(2, only_here.job)  # the workers' sys.path was fixed at their start
    finally:
        sys.path.remove(str(tmp_path))
    assert [type(r.error) for r in results] == [ModuleNotFoundError, ModuleNotFoundError]
    assert "No module named 'only_here'" in str(results[0].error) and "pickle" in results[0].traceback
    with pytest.raises((pickle.PicklingError, AttributeError), match="(?i)can't pickle"):
        pool.run(2, lambda: 1)
    assert pool.run(2, harness_jobs.raise_on, 5) == [0, 1]  # nothing started by the refused call
