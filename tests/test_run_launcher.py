"""``python -m distload.run``: torch's elastic launcher with distload's exit codes and one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import distload
from distload.run import split_argv
from tests.hf_checkpoints import copy_checkpoint, delete_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "distload.run", "--nproc-per-node", "4", *args, "--device", "cpu",
                           "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": ROOT})


def test_split_keeps_torchrun_options_for_the_launcher():
    assert split_argv(["--nnodes=1", "--rdzv-backend", "c10d", "ckpt", "-tp", "2", "--standalone", "--json", "r"]) \
        == (["--nnodes=1", "--rdzv-backend", "c10d", "--standalone"], ["ckpt", "-tp", "2", "--json", "r"])


def test_the_four_verdicts_at_world_4(tmp_path):
    ckpt = copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))
    ok = launch(ckpt, "--tp", "2", "--json", "ok.json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("distload load: COMPLETE") == 1 and json.loads((tmp_path / "ok.json").read_text())["ok"]

    delete_tensors(ckpt, ["model.norm.weight"])
    incomplete = launch(ckpt, "--tp", "2", cwd=tmp_path)
    assert incomplete.returncode == 3, incomplete.stderr
    assert incomplete.stdout.count("distload load: INCOMPLETE") == 1  # loaded once: no restart
    assert "ChildFailedError" not in incomplete.stderr and "Traceback" not in incomplete.stderr

    failed = launch(str(tmp_path / "nowhere"), cwd=tmp_path)
    assert failed.returncode == 1
    assert [line for line in failed.stderr.splitlines() if line.startswith("distload")] == [
        f"distload: error: checkpoint directory does not exist [file {tmp_path / 'nowhere'}, rank 0]"]

    usage = launch(ckpt, "--tp", "8", cwd=tmp_path)  # refused before any rank starts
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines() == [
        "distload.run: error: tp=8 x pp=1 needs 8 ranks, but the world has 4: start 8 (torchrun --nproc-per-node 8 "
        "-m distload ...), or plan the layout without them: python -m distload CHECKPOINT --dry-run --world 8 ..."]


@pytest.mark.parametrize("args,line", [
    (["--module", "x"], "distload.run: error: --module is a torchrun option that picks the program; distload.run "
                        "always runs distload (use torchrun itself for other programs)"),
    (["--tr", "off"], "distload.run: error: unrecognized arguments: --tr"),
])
def test_launcher_usage_errors_exit_2_before_starting_ranks(tmp_path, args, line):
    proc = launch(*args, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (2, [line])
