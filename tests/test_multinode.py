"""Multi-node torchrun: two agents on this machine (``launch/multinode.sh``: ``python -m distload.run
--nnodes 2 --nproc-per-node 2`` with a c10d rendezvous on 127.0.0.1) load as one agent of 4 ranks does,
each agent exits with its node's code, and rank-local facts are the node's, not the job's."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import uuid

import pytest

import distload
from distload.dryrun import dry_run
from distload.testing import free_port
from tests.hf_checkpoints import copy_checkpoint, delete_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = '''"""tests/test_multinode.py's probe: on each torchrun rank, records the world distload's load
works with (``api._connect_and_load``'s) and the reader threads it chose (``Executor``'s)."""
import json
import os

if os.environ.get("DISTLOAD_PROBE_DIR") and "GROUP_RANK" in os.environ:
    os.sched_getaffinity = lambda pid: set(range(8))  # 8 cores: threads = 8 // this node's ranks
    import distload.api as api

    _connect, _executor, _seen = api._connect_and_load, api.Executor, {}

    def _connect_and_load(checkpoint, config, world, *args, **kwargs):
        _seen.update(rank=world.rank, local_rank=world.local_rank, local_world_size=world.local_world_size,
                     node=int(os.environ["GROUP_RANK"]), agent_pid=os.getppid())
        return _connect(checkpoint, config, world, *args, **kwargs)

    def Executor(*args, num_threads, **kwargs):
        with open(os.path.join(os.environ["DISTLOAD_PROBE_DIR"], f"rank-{_seen['rank']}.json"), "w") as f:
            json.dump({**_seen, "read_threads": num_threads}, f)
        return _executor(*args, num_threads=num_threads, **kwargs)

    api._connect_and_load, api.Executor = _connect_and_load, Executor
'''

SAME = ("complete", "ok", "layout", "num_units", "missing", "inconsistent", "unexpected", "defaulted", "checkpoint")
"""report fields that do not depend on timing or on how the ranks were started"""
PER_RANK = ("rank", "units_loaded", "units_owned", "units_not_loaded", "bytes_read", "files_opened")


def _env(tmp_path) -> dict:
    probe = tmp_path / "probe"
    (probe / "site").mkdir(parents=True)
    (probe / "site" / "sitecustomize.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": f"{probe / 'site'}{os.pathsep}{ROOT}", "DISTLOAD_PROBE_DIR": str(probe),
            "PYTHON": sys.executable}


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def two_agents(ckpt: str, tmp_path, *args: str) -> list[tuple[int, str, str]]:
    """Both agents of a 2 x 2 job through launch/multinode.sh, each in its own directory (its "node")."""
    env = {**_env(tmp_path), "NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": uuid.uuid4().hex}
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        procs.append(subprocess.Popen(["bash", os.path.join(ROOT, "launch", "multinode.sh"), ckpt, *args], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return _finish(procs)


def one_agent(ckpt: str, tmp_path, *args: str) -> tuple[int, str, str]:
    env = _env(tmp_path)
    (tmp_path / "node0").mkdir()
    return _finish([subprocess.Popen([sys.executable, "-m", "distload.run", "--nproc-per-node", "4", ckpt, *args],
                                     cwd=tmp_path / "node0", env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)])[0]


def reports(tmp_path) -> dict[int, dict]:
    """Every rank's --json report-{rank}.json, by rank, wherever its agent ran."""
    out = {}
    for path in glob.glob(str(tmp_path / "node*" / "report-*.json")):
        with open(path) as f:
            out[int(path.rsplit("-", 1)[1].removesuffix(".json"))] = json.load(f) | {"dir": os.path.dirname(path)}
    return out


def probes(tmp_path) -> dict[int, dict]:
    out = {}
    for path in glob.glob(str(tmp_path / "probe" / "rank-*.json")):
        with open(path) as f:
            p = json.load(f)
        out[p["rank"]] = p
    return out


def essentials(report: dict) -> dict:
    return {**{k: report[k] for k in SAME}, "ranks": [{k: r[k] for k in PER_RANK} for r in report["ranks"]]}


ARGS = ("--tp", "4", "--device", "cpu", "--quiet", "--json", "report-{rank}.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return copy_checkpoint(distload.example_checkpoint(), str(tmp_path_factory.mktemp("multinode") / "ckpt"))


def test_two_agents_load_as_one_agent_of_four_ranks(checkpoint, tmp_path):
    two = two_agents(checkpoint, tmp_path / "two", *ARGS)
    assert [code for code, _, _ in two] == [0, 0], two
    assert sum(stdout.count("distload load: COMPLETE") for _, stdout, _ in two) == 1  # rank 0 reports, once
    one = one_agent(checkpoint, tmp_path / "one", *ARGS)
    assert one[0] == 0, one

    multi, single = reports(tmp_path / "two"), reports(tmp_path / "one")
    assert sorted(multi) == sorted(single) == [0, 1, 2, 3]
    assert essentials(multi[0])["ranks"][3]["bytes_read"] > 0
    for rank in range(4):  # every rank holds the job's merged report, the same as one agent's
        assert essentials(multi[rank]) == essentials(single[0]), rank
    assert multi[0]["complete"] and multi[0]["ok"] and multi[0]["layout"]["world_size"] == 4

    # rank-local facts as distload sees them: each node's own LOCAL_RANK / LOCAL_WORLD_SIZE
    seen = probes(tmp_path / "two")
    nodes = {rank: (p["node"], p["agent_pid"]) for rank, p in seen.items()}
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]  # ranks 0-1 on one agent, 2-3 on the other
    assert multi[2]["dir"] == multi[3]["dir"] != multi[0]["dir"]  # each rank writes on its own node
    assert {r: (p["local_rank"], p["local_world_size"], p["read_threads"]) for r, p in seen.items()} == \
        {0: (0, 2, 4), 1: (1, 2, 4), 2: (0, 2, 4), 3: (1, 2, 4)}  # 8 cores shared by the node's 2 ranks
    assert {r: (p["local_rank"], p["local_world_size"], p["read_threads"]) for r, p in
            probes(tmp_path / "one").items()} == {r: (r, 4, 2) for r in range(4)}


def test_an_incomplete_checkpoint_exits_3_on_both_agents(checkpoint, tmp_path):
    ckpt = copy_checkpoint(checkpoint, str(tmp_path / "incomplete"))
    delete_tensors(ckpt, ["model.layers.1.mlp.down_proj.weight"])
    two = two_agents(ckpt, tmp_path / "two", *ARGS)
    assert [code for code, _, _ in two] == [3, 3], two  # each agent returns its own node's code
    assert sum(stdout.count("distload load: INCOMPLETE") for _, stdout, _ in two) == 1
    assert not any("ChildFailedError" in stderr or "Traceback" in stderr for _, _, stderr in two), two
    multi = reports(tmp_path / "two")
    assert sorted(multi) == [0, 1, 2, 3]
    planned = dry_run(ckpt, distload.LoadConfig(tp=4), world_size=4).to_json()
    for report in multi.values():
        assert report["missing"] == planned["missing"] == [
            {"name": "model.layers.1.mlp.down_proj.weight", "owners": [0, 1, 2, 3]}]
        assert (report["complete"], report["ok"], report["unexpected"]) == (False, False, [])


SRUN = '''#!/usr/bin/env bash
# srun on one machine: one task per "node" (SLURM_JOB_NUM_NODES of them), each in its own node<i>
# folder; exits with the highest task code, as srun does
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  (mkdir -p "node$i" && cd "node$i" && SLURM_NODEID=$i SLURM_PROCID=$i exec "$@") &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || { c=$?; if (( c > rc )); then rc=$c; fi; }; done
exit $rc
'''
SCONTROL = '''#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1
'''


def test_the_slurm_script_runs_one_agent_per_node_and_fails_the_job_with_their_code(checkpoint, tmp_path):
    ckpt = copy_checkpoint(checkpoint, str(tmp_path / "incomplete"))
    delete_tensors(ckpt, ["model.layers.0.self_attn.o_proj.weight"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = tmp_path / "job"
    job.mkdir()
    env = {**_env(tmp_path), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": uuid.uuid4().hex[:8], "NPROC_PER_NODE": "2",
           "RDZV_PORT": str(free_port())}
    code, stdout, stderr = _finish([subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), ckpt, *ARGS],
                                                     cwd=job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     text=True)])[0]
    assert code == 3, (stdout, stderr)  # the job fails with the nodes' distload code, not srun's own
    assert stdout.count("distload load: INCOMPLETE") == 1 and "Traceback" not in stderr
    multi = reports(job)
    assert sorted(multi) == [0, 1, 2, 3]  # one job of 2 nodes x 2 ranks, formed at the c10d rendezvous
    assert multi[2]["dir"] == multi[3]["dir"] != multi[0]["dir"]
    for report in multi.values():
        assert report["missing"] == [{"name": "model.layers.0.self_attn.o_proj.weight", "owners": [0, 1, 2, 3]}]
