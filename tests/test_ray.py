"""Loading onto Ray actors (CPU, gloo, 4 actors on the session's local Ray cluster)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import distload
import distload.ray
from tests import ray_jobs, track_jobs
from tests.hf_checkpoints import HFSpec, copy_checkpoint, delete_tensors, hf_logits, put_tensors, read_tensors, \
    write_hf_checkpoint

ray = pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINDINGS = ("missing", "inconsistent", "defaulted", "unexpected")
TIMING = ("seconds", "gbps", "merge_seconds")
"""report fields that measure time: they differ between any two runs"""


def _gone(pids, within: float = 10.0) -> bool:
    """Whether every process of ``pids`` has ended within ``within`` seconds (Ray reaps its workers)."""
    deadline = time.monotonic() + within
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _cluster_idle(within: float = 10.0) -> bool:
    """Whether all 4 CPUs are free again (no actor, no placement group holds one)."""
    deadline = time.monotonic() + within
    while ray.available_resources().get("CPU", 0) < 4:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _untimed(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in TIMING}
    out["ranks"] = [{k: v for k, v in r.items() if k not in TIMING} for r in report["ranks"]]
    return out


def test_local_ranks_count_each_nodes_ranks_in_rank_order():
    worlds = distload.ray.worlds_for(["n1", "n2", "n1", "n1"], master_addr="10.0.0.1", master_port=29500)
    assert [(w.rank, w.world_size, w.local_rank, w.local_world_size) for w in worlds] == [
        (0, 4, 0, 3), (1, 4, 0, 1), (2, 4, 1, 3), (3, 4, 2, 3)]
    assert {(w.master_addr, w.master_port) for w in worlds} == {("10.0.0.1", 29500)}
    # both given: no probe of rank 0's node, the override as given (a cluster's other interface)
    overridden = distload.ray.rendezvous(["n1", "n2"], master_addr="127.0.0.1", master_port=29501)
    assert [(w.rank, w.master_addr, w.master_port) for w in overridden] == [(0, "127.0.0.1", 29501), (1, "127.0.0.1", 29501)]


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(distload.DistloadError) as err:
        distload.ray.rendezvous(["node"])
    assert str(err.value) == "distload.ray needs Ray, which is not installed: pip install distload[ray]"


def test_a_strategy_that_may_scatter_the_ranks_is_refused_before_any_actor_starts():
    with pytest.raises(distload.ConfigError) as err:
        distload.ray.load(distload.example_checkpoint(), distload.LoadConfig(device="cpu"), strategy="SPREAD")
    assert str(err.value) == "strategy 'SPREAD' is not one of PACK, STRICT_PACK"


def test_actors_logits_match_transformers_and_checksums_the_checkpoint(ray_cluster, tmp_path):
    ckpt = write_hf_checkpoint(str(tmp_path / "llama"), HFSpec(model_type="llama"))
    ids = torch.tensor([[3, 17, 99, 5, 64, 1]])
    with distload.ray.load(ckpt, distload.LoadConfig(tp=2, pp=2, device="cpu")) as model:
        assert model.report.complete and model.report.layout["world_size"] == 4
        logits = model.forward(ids)  # from rank 2, the first of the last stage
        sums = model.checksums()
        pids = model.pids
    torch.testing.assert_close(logits, hf_logits(ckpt, ids), rtol=1e-4, atol=1e-4)
    tensors = read_tensors(ckpt)
    norm = tensors["model.norm.weight"]  # replicated over the last stage's ranks 2 and 3
    assert [sums[r]["model.norm.weight"].sha256 for r in (2, 3)] == [hashlib.sha256(norm.numpy().tobytes()).hexdigest()] * 2
    assert "model.norm.weight" not in sums[0]  # stage 0 holds no final norm
    down = "model.layers.1.mlp.down_proj.weight"  # split by columns over ranks 2 and 3
    assert sums[2][down].sum + sums[3][down].sum == pytest.approx(tensors[down].double().sum().item(), abs=1e-9)
    assert sums[2][down].sha256 != sums[3][down].sha256
    assert _gone(pids) and _cluster_idle()  # unload killed the actors and removed the placement group


def test_engine_actors_load_their_own_model_through_rendezvous(ray_cluster, pool, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = {"norm.weight": 1 + 0.2 * torch.randn(8), "norm.bias": 0.2 * torch.randn(8),
               "up.weight": torch.randn(16, 8), "down.weight": torch.randn(8, 16)}
    for name, tensors in (("whole", weights), ("no-up", {n: t for n, t in weights.items() if n != "up.weight"})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"hidden": 8, "ffn": 16}))
    workers = [ray.remote(num_cpus=1)(ray_jobs.EngineWorker).remote() for _ in range(4)]
    try:
        nodes = ray.get([w.node_id.remote() for w in workers])
        worlds = distload.ray.rendezvous(nodes)
        assert [w.rank for w in worlds] == [0, 1, 2, 3] and worlds[0].master_addr == ray.util.get_node_ip_address()
        reports = ray.get([w.load.remote(str(tmp_path / "whole"), world) for w, world in zip(workers, worlds)])
        x = torch.randn(2, 3, 8)
        outs = ray.get([w.forward.remote(x) for w in workers])
        ray.get([w.close.remote() for w in workers])
        # the same actors again, on a new rendezvous: a checkpoint without up.weight
        broken = ray.get([w.load.remote(str(tmp_path / "no-up"), world)
                          for w, world in zip(workers, distload.ray.rendezvous(nodes))])
    finally:
        for w in workers:
            ray.kill(w)
    assert all(_untimed(r) == _untimed(reports[0]) for r in reports) and reports[0]["complete"] and reports[0]["layout"]["tp"] == 4
    assert reports[0]["defaulted"] == [{"name": "out.scale", "owners": [0, 1, 2, 3]}]
    normed = torch.nn.functional.layer_norm(x, (8,), weights["norm.weight"], weights["norm.bias"])
    expected = torch.relu(normed @ weights["up.weight"].T) @ weights["down.weight"].T  # scale defaults to 1.0
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(_untimed(r) == _untimed(broken[0]) for r in broken)
    assert (broken[0]["complete"], broken[0]["ok"]) == (False, False)
    assert broken[0]["missing"] == [{"name": "up.weight", "owners": [0, 1, 2, 3]}]
    under_torchrun = pool.run(4, ray_jobs.engine_mlp_report, str(tmp_path / "no-up"))  # the same build, pool ranks
    assert {k: under_torchrun[0][k] for k in FINDINGS} == {k: broken[0][k] for k in FINDINGS}


def test_engine_actors_merge_their_own_loads_through_track_world(ray_cluster, pool, tmp_path):
    """The tracking API from Ray actors: each actor loads the engine-style model with its own loop,
    recorded by ``distload.track``, and ``track.merge(world=...)`` forms the group to merge over."""
    ckpt = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "no-q"))
    q = "model.layers.1.self_attn.q_proj.weight"  # stage 1's, split over its TP ranks 2 and 3
    delete_tensors(ckpt, [q])
    layout = {"tp": 2, "pp": 2}
    workers = [ray.remote(num_cpus=1)(ray_jobs.EngineWorker).remote() for _ in range(4)]
    try:
        worlds = distload.ray.rendezvous(ray.get([w.node_id.remote() for w in workers]))
        reports = ray.get([w.track.remote(ckpt, layout, world) for w, world in zip(workers, worlds)])
    finally:
        for w in workers:
            ray.kill(w)
    assert all(_untimed(r) == _untimed(reports[0]) for r in reports)
    assert (reports[0]["mode"], reports[0]["complete"], reports[0]["ok"]) == ("track", False, False)
    assert reports[0]["missing"] == [{"name": q, "owners": [2, 3]}]
    loaded = pool.run(4, track_jobs.distload_report, ckpt, layout)[0]["report"]  # distload.load's own findings
    assert {k: loaded[k] for k in FINDINGS} == {k: reports[0][k] for k in FINDINGS}
    assert _cluster_idle()


def test_a_killed_actor_fails_the_load_naming_its_rank_and_leaves_nothing(ray_cluster, tmp_path):
    timeout = 3.0
    build = functools.partial(ray_jobs.kill_rank, victim=2, pid_dir=str(tmp_path))
    with pytest.raises(distload.PeerFailedError) as err:
        distload.ray.load(distload.example_checkpoint(), distload.LoadConfig(tp=2, device="cpu", failure_timeout=timeout),
                          num_ranks=4, build=build)
    ended = time.time()
    killed_at = float((tmp_path / "killed-at").read_text())
    # the watch's own words for a silent rank (tests/test_failing_ranks.py pins them), naming it
    assert str(err.value).startswith("rank 2 ") and str(err.value).endswith(" [rank 2]")
    assert (err.value.failed_rank, err.value.lost_ranks) == (2, (2,))
    # bound: the failure timeout, a heartbeat interval, and slack for a loaded 2-core machine
    assert ended - killed_at < timeout + 8
    pids = [int((tmp_path / f"rank-{r}").read_text()) for r in range(4)]
    assert _gone(pids) and _cluster_idle()


def test_a_placement_group_of_the_callers_hosts_the_ranks_and_is_left_in_place(ray_cluster):
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        with distload.ray.load(distload.example_checkpoint(), distload.LoadConfig(tp=2, device="cpu"),
                               placement_group=pg) as model:
            assert model.report.ok and model.report.layout["tp"] == 2
            assert [(o.rank, o.error, o.lost, o.report.ok) for o in model.outcomes] == [(0, None, False, True),
                                                                                     (1, None, False, True)]
            pids = model.pids
        assert _gone(pids)
        assert placement_group_table(pg)["state"] == "CREATED"  # the caller's: unload leaves it
    finally:
        remove_placement_group(pg)
    assert _cluster_idle()


def test_a_placement_group_that_cannot_host_every_rank_is_refused_before_any_actor_starts(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    one, halves = placement_group([{"CPU": 1}]), placement_group([{"CPU": 1}, {"CPU": 0.5}])
    try:
        with pytest.raises(distload.ConfigError) as err:
            distload.ray.load(distload.example_checkpoint(), distload.LoadConfig(tp=2, device="cpu"), placement_group=one)
        assert str(err.value) == "the placement group has 1 bundle, but the job has 2 ranks (one bundle per rank)"
        with pytest.raises(distload.ConfigError) as err:
            distload.ray.load(distload.example_checkpoint(), distload.LoadConfig(tp=2, device="cpu"),
                              placement_group=halves)
        assert str(err.value) == ("bundles [1] of the placement group have less than 1 CPU; each rank's actor "
                                  "needs {'CPU': 1}")
    finally:
        remove_placement_group(one)
        remove_placement_group(halves)
    assert _cluster_idle()


def _ray_launch(*args: str, cwd, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "ray_launch.py"), *args, "--address", address,
                           "--device", "cpu", "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_launcher_exits_2_for_a_world_too_small_naming_its_own_option_and_1_for_a_truncated_shard(ray_cluster,
                                                                                                    tmp_path):
    from distload.checkpoint.directory import open_checkpoint

    usage = _ray_launch("--tp", "2", "--num-ranks", "1", cwd=tmp_path, address=ray_cluster)
    assert (usage.returncode, usage.stderr.splitlines()) == (2, [
        "distload: error: tp=2 x pp=1 needs 2 ranks, but the world has 1: start 2 (launch/ray_launch.py ... "
        "--num-ranks 2), or plan the layout without them: python -m distload CHECKPOINT --dry-run --world 2 ... [rank 0]"])
    cut = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "cut"))
    shard = os.path.join(cut, "model-00002-of-00002.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(distload.CheckpointError) as err:  # what every rank meets, read here in-process
        open_checkpoint(cut)
    failed = _ray_launch(cut, "--tp", "2", "--json", "cut.json", cwd=tmp_path, address=ray_cluster)
    assert failed.returncode == 1, failed.stderr
    assert [line for line in failed.stderr.splitlines() if line.startswith("distload")] == [
        f"distload: error: {err.value.with_rank(0)}"]
    verdict = json.loads((tmp_path / "cut.json").read_text())
    assert (verdict["exit_code"], verdict["ok"], verdict["error"]["type"], verdict["error"]["file"]) == (
        1, False, "CheckpointError", shard)
    assert _cluster_idle()


def _torchrun_cli(*args: str, cwd) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen([sys.executable, "-m", "distload.run", "--nproc-per-node", "4", *args, "--device", "cpu",
                             "--quiet"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": ROOT})


def test_sigterm_ends_the_launcher_with_143_and_every_ranks_verdict(ray_cluster, tmp_path):
    from ray.util.placement_group import placement_group_table

    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "ray_launch.py"), "--tp", "2", "--num-ranks",
                             "8", "--address", ray_cluster, "--device", "cpu", "--quiet", "--json", "out-{rank}.json",
                             "--ready-timeout", "120"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # 8 bundles of 1 CPU never fit the 4 CPUs: the driver waits in ray.get, where Ray has its own handlers
        deadline = time.monotonic() + 60
        while not any(g["state"] == "PENDING" for g in placement_group_table().values()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.splitlines()[-1] == "distload: error: interrupted: SIGTERM received [rank 0]"
    for rank in range(8):  # every rank's file, as each torchrun rank writes on SIGTERM
        verdict = json.loads((tmp_path / f"out-{rank}.json").read_text())
        assert (verdict["exit_code"], verdict["rank"], verdict["error"]["message"]) == (
            143, rank, "interrupted: SIGTERM received"), rank
    assert _cluster_idle() and not any(g["state"] == "PENDING" for g in placement_group_table().values())


@pytest.mark.slow  # the slowest here: three launchers in subprocesses
def test_launcher_verdicts_equal_the_torchrun_clis(ray_cluster, tmp_path):
    bad = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "bad"))
    delete_tensors(bad, ["model.layers.1.post_attention_layernorm.weight"])
    put_tensors(bad, {"model.layers.1.extra.weight": torch.ones(4)})
    under_torchrun = _torchrun_cli(bad, "--tp", "2", "--dp", "2", "--json", "torchrun-{rank}.json", cwd=tmp_path)
    try:  # the torchrun CLI runs alongside the two Ray launches
        ok = _ray_launch(distload.example_checkpoint(), "--tp", "2", "--num-ranks", "4", "--json", "ok.json",
                         cwd=tmp_path, address=ray_cluster)
        on_ray = _ray_launch(bad, "--tp", "2", "--dp", "2", "--json", "ray-{rank}.json", cwd=tmp_path,
                             address=ray_cluster)
        torchrun_err = under_torchrun.communicate(timeout=300)[1]
    finally:
        under_torchrun.kill()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("distload load: COMPLETE")
    ok_report = json.loads((tmp_path / "ok.json").read_text())
    assert ok_report["ok"] and ok_report["layout"]["world_size"] == 4
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["ok.json", *(f"{kind}-{r}.json" for kind in ("ray", "torchrun")
                                                                            for r in range(4))]

    assert (on_ray.returncode, under_torchrun.returncode) == (3, 3), on_ray.stderr + torchrun_err
    assert on_ray.stdout.count("distload load: INCOMPLETE") == 1
    ray_report = json.loads((tmp_path / "ray-0.json").read_text())
    assert [e["name"] for e in ray_report["missing"]] == ["model.layers.1.post_attention_layernorm.weight"]
    assert ray_report["unexpected"] == [{"name": "model.layers.1.extra.weight"}]
    for rank in range(4):  # every rank's own file, as each torchrun rank writes it
        ray_rank = json.loads((tmp_path / f"ray-{rank}.json").read_text())
        assert _untimed(ray_rank) == _untimed(json.loads((tmp_path / f"torchrun-{rank}.json").read_text())), rank
        assert _untimed(ray_rank) == _untimed(ray_report)  # the merged report, on every rank
    assert _cluster_idle()
