"""Options and launcher variables are checked before anything is read; every exit writes its verdict."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import distload
from distload import __main__ as cli_main
from distload.options import MAX_WORLD
from distload.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *args: str) -> tuple[int, list[str], str]:
    """Runs the CLI in this process; returns its exit code, its stderr lines and its stdout."""
    code = cli_main.main(list(args))
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("args,line", [
    ([""], "the checkpoint argument is empty (an unset shell variable?); name a directory, or leave it out to "
           "load the bundled example"),
    (["--dry-run", "--world", "0"], f"--world 0 is not a world size distload plans for (1 to {MAX_WORLD} ranks)"),
    (["--dry-run", "--world", str(2 ** 40)],
     f"--world {2 ** 40} is not a world size distload plans for (1 to {MAX_WORLD} ranks)"),
    (["--world", "4"], "--world sets the planned world of --dry-run; a real load takes its world from the "
                       "launcher (WORLD_SIZE)"),
    (["--failure-timeout", "0.01"], "failure_timeout must be a number of seconds of at least 1 (the watch cannot "
                                    "tell a shorter silence from a busy host), got 0.01"),
    (["--failure-timeout", "nan"], "failure_timeout must be a number of seconds of at least 1 (the watch cannot "
                                   "tell a shorter silence from a busy host), got nan"),
    (["--redundant-experts", "-1"], "redundant_experts must be 0 or a positive integer, got -1"),
    (["--tr", "off"], "unrecognized arguments: --tr"),  # "off" is taken for the checkpoint
    (["-tp", "two"], "argument --tp/--tensor-parallel-size/-tp: invalid int value: 'two'"),
])
def test_unusable_options_exit_2_with_one_line(capsys, args, line):
    code, err, out = run_main(capsys, "--device", "cpu", *args)
    assert (code, err, out) == (2, [f"distload: error: {line}"], "")


@pytest.mark.parametrize("env,line", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR is not set: start the ranks with torchrun, or set "
                          "MASTER_ADDR and MASTER_PORT to rank 0's address"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a TCP port (1 to 65535)"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE 0 is not a world size distload plans for (1 to 1048576 ranks)"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     None),  # rank 3 does not speak: no rank 0 is known to be this process
])
def test_unusable_launcher_variables_exit_2(capsys, monkeypatch, env, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err, _ = run_main(capsys, "--device", "cpu")
    assert code == 2
    assert err == ([f"distload: error: {line}"] if line else [])


def test_json_paths_are_checked_before_loading(capsys, tmp_path):
    code, err, _ = run_main(capsys, "--device", "cpu", "--json", str(tmp_path))
    assert (code, err) == (2, [f"distload: error: --json {tmp_path} names a directory; give a file path such as "
                               f"{tmp_path / 'report.json'}"])
    code, err, _ = run_main(capsys, "--device", "cpu", "--json", str(tmp_path / "no" / "r.json"))
    assert (code, err) == (2, [f"distload: error: --json {tmp_path / 'no' / 'r.json'}: directory "
                               f"{tmp_path / 'no'} does not exist"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    code, err, _ = run_main(capsys, "--device", "cuda")
    assert (code, err) == (2, ["distload: error: --device cuda, but this machine has no usable CUDA device "
                               "(torch.cuda.is_available() is False); use --device cpu"])


@pytest.mark.parametrize("option", [["--ep", "2"], ["--expert-placement", "round_robin"],
                                    ["--redundant-experts", "1"]])
def test_expert_options_on_a_dense_model_exit_2(capsys, option):
    code, err, _ = run_main(capsys, "--dry-run", "--world", "2", *option)
    name, value = option[0].lstrip("-").replace("-", "_"), option[1]
    assert (code, err) == (2, [f"distload: error: {name}={value} applies to mixture-of-experts models, and "
                               "model_type 'llama' has no experts; split it with tp, pp and dp"])


def test_a_failing_run_replaces_an_earlier_verdict(capsys, tmp_path):
    report = tmp_path / "r.json"
    assert run_main(capsys, "--device", "cpu", "--quiet", "--json", str(report))[0] == 0
    assert json.loads(report.read_text())["complete"] is True
    code, err, _ = run_main(capsys, str(tmp_path / "nowhere"), "--device", "cpu", "--json", str(report))
    assert code == 1 and len(err) == 1
    verdict = json.loads(report.read_text())
    assert verdict["complete"] is False and verdict["ok"] is False and verdict["exit_code"] == 1
    assert verdict["error"]["type"] == "CheckpointError" and verdict["error"]["rank"] == 0
    assert verdict["error"]["message"] == "checkpoint directory does not exist"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # written by a rename, nothing left over
    # a usage error found after parsing replaces it too
    assert run_main(capsys, "--device", "cpu", "--json", str(report), "--dry-run", "--world", "0")[0] == 2
    assert json.loads(report.read_text())["exit_code"] == 2


def test_a_run_killed_outright_leaves_no_earlier_verdict(tmp_path):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"complete": True, "ok": True}))
    proc = _start(tmp_path, 1, "--json", str(report))[0]
    _await_ready(tmp_path, [proc], 1)
    proc.kill()
    proc.wait(timeout=60)
    verdict = json.loads(report.read_text())
    assert verdict["complete"] is False and verdict["error"]["type"] == "NotFinished"


def test_an_interrupt_ends_the_run_with_one_line_and_its_verdict(capsys, tmp_path, monkeypatch):
    from distload import api

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal lands first
        raise AssertionError("not interrupted")

    monkeypatch.setattr(api, "load", interrupted_load)
    code, err, _ = run_main(capsys, "--device", "cpu", "--json", str(tmp_path / "r.json"))
    assert (code, err) == (130, ["distload: error: interrupted: SIGINT received [rank 0]"])
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def _start(tmp_path, world: int, *args: str) -> list[subprocess.Popen]:
    """Starts ``world`` CLI ranks (plain processes, rank 0 hosting the store) that pause mid-load."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.cli_jobs", str(tmp_path), "--", "--device", "cpu", "--quiet",
             "--failure-timeout", "60", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _await_ready(tmp_path, procs, world: int) -> None:
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"rank-{r}").exists() for r in range(world)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _finish(procs) -> list[tuple[int, list[str]]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=60)
            out.append((p.returncode, [line for line in err.splitlines() if line.startswith("distload")]))
    finally:
        for p in procs:
            p.kill()
    return out


def test_sigterm_ends_every_rank_with_143_and_one_line(tmp_path):
    procs = _start(tmp_path, 4, "--json", str(tmp_path / "r.json"))
    _await_ready(tmp_path, procs, 4)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    out = _finish(procs)
    assert [code for code, _ in out] == [143] * 4, out
    assert out[0][1] == ["distload: error: interrupted: SIGTERM received [rank 0]"]
    assert all(lines == [] for _, lines in out[1:]), out
    verdict = json.loads((tmp_path / "r.json").read_text())
    assert verdict["exit_code"] == 143 and verdict["complete"] is False


def test_ctrl_c_on_one_rank_stops_the_others_and_rank_0_names_it(tmp_path):
    procs = _start(tmp_path, 4, "--json", str(tmp_path / "r-{rank}.json"))
    _await_ready(tmp_path, procs, 4)
    procs[2].send_signal(signal.SIGINT)
    out = _finish(procs)
    assert [code for code, _ in out] == [1, 1, 130, 1], out
    assert out[0][1] == ["distload: error: Interrupted: SIGINT received [rank 2]"]
    assert all(lines == [] for _, lines in out[1:]), out
    for rank in range(4):  # {rank} in the path: every rank writes its own verdict
        verdict = json.loads((tmp_path / f"r-{rank}.json").read_text())
        assert verdict["rank"] == rank and verdict["exit_code"] == (130 if rank == 2 else 1)
        assert verdict["error"]["failed_rank"] == (None if rank == 2 else 2)


def test_non_utf8_names_print_on_a_strict_terminal(tmp_path):
    import shutil
    name = os.fsdecode(b"ckpt-\xff")
    shutil.copytree(distload.example_checkpoint(), os.path.join(str(tmp_path), name))
    proc = subprocess.run([sys.executable, "-m", "distload", name, "--device", "cpu", "--quiet"], cwd=tmp_path,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert b"COMPLETE - " in proc.stdout and b"ckpt-\\udcff" in proc.stdout


def test_rank_0_killed_without_torchrun_the_lowest_survivor_names_it(tmp_path):
    procs = _start(tmp_path, 4, "--json", str(tmp_path / "r.json"), "--failure-timeout", "3")
    _await_ready(tmp_path, procs, 4)
    procs[0].kill()  # it hosted the store
    out = _finish(procs)
    assert [code for code, _ in out[1:]] == [1, 1, 1], out
    lines = out[1][1]
    assert len(lines) == 1 and lines[0].startswith("distload: error: lost the rendezvous store hosted by rank 0 ("), out
    assert lines[0].endswith(" [rank 1]") and out[2][1] == out[3][1] == [], out
    verdict = json.loads((tmp_path / "r.json").read_text())  # rank 1 replaced rank 0's placeholder
    assert verdict["rank"] == 1 and verdict["error"]["lost_ranks"] == [0] and verdict["exit_code"] == 1


def test_rank_0_stopped_under_torchrun_is_named_silent_by_rank_1(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([torchrun, "--nproc-per-node", "4", "--master-port", str(free_port()), "-m",
                             "tests.cli_jobs", str(tmp_path), "--", "--device", "cpu", "--quiet",
                             "--failure-timeout", "3"], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank0 = None
    try:
        _await_ready(tmp_path, [proc], 4)
        rank0 = int((tmp_path / "rank-0").read_text())
        os.kill(rank0, signal.SIGSTOP)
        # a stopped rank takes no SIGTERM: torchrun would wait its 30 s grace before killing it
        survivors = [int((tmp_path / f"rank-{r}").read_text()) for r in range(1, 4)]
        deadline = time.monotonic() + 90
        while any(_running(pid) for pid in survivors) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(rank0, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if rank0 is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(rank0, sig)
        proc.kill()
    lines = [line for line in err.splitlines() if line.startswith("distload")]
    assert len(lines) == 1, err
    assert re.fullmatch(r"distload: error: rank 0 silent for \d+ s \(no heartbeat\) \[rank \d\]", lines[0]), lines
