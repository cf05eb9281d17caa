"""``python -m distload`` and ``torchrun -m distload``: exit codes, output, JSON report."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys

import pytest

import distload
from tests import jobs
from tests.hf_checkpoints import copy_checkpoint, delete_tensors, put_tensors

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def cli(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distload", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture()
def example_copy(tmp_path):
    return copy_checkpoint(distload.example_checkpoint(), str(tmp_path / "ckpt"))


def test_complete_load_exits_0_and_writes_json(tmp_path):
    proc = cli("--device", "cpu", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and report["mode"] == "load"
    assert proc.stdout.count("distload load: COMPLETE") == 1


def test_missing_tensor_exits_3_with_the_report(tmp_path, example_copy):
    delete_tensors(example_copy, ["model.layers.1.post_attention_layernorm.weight"])
    proc = cli(example_copy, "--device", "cpu", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "INCOMPLETE" in proc.stdout and "model.layers.1.post_attention_layernorm.weight" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is False
    assert report["missing"] == [{"name": "model.layers.1.post_attention_layernorm.weight", "owners": [0]}]


def test_unexpected_tensor_fails_only_under_strict_and_ignore_excludes_it(tmp_path, example_copy):
    import torch
    put_tensors(example_copy, {"model.extra.weight": torch.zeros(3)})
    assert cli(example_copy, "--device", "cpu", cwd=tmp_path).returncode == 0
    strict = cli(example_copy, "--device", "cpu", "--strict", "--json", "r.json", cwd=tmp_path)
    assert strict.returncode == 3
    assert json.loads((tmp_path / "r.json").read_text())["unexpected"] == [{"name": "model.extra.weight"}]
    assert cli(example_copy, "--device", "cpu", "--strict", "--ignore", r"^model\.extra\.", cwd=tmp_path).returncode == 0


def test_bad_checkpoint_exits_1_with_one_line(tmp_path):
    proc = cli(str(tmp_path / "nowhere"), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distload: error: checkpoint directory does not exist")
    assert "nowhere" in lines[0] and "rank 0" in lines[0]


@pytest.mark.parametrize("args", [["--tp", "0"], ["--device", "tpu"], ["--no-such-flag"], ["--tp", "2"]])
def test_usage_errors_exit_2(tmp_path, args):
    assert cli("--device", "cpu", *args, cwd=tmp_path).returncode == 2


def test_track_off_proves_nothing_and_says_so_with_ok_true_and_exit_0(tmp_path, example_copy):
    delete_tensors(example_copy, ["model.norm.weight"])  # not seen: nothing is tracked
    proc = cli(example_copy, "--device", "cpu", "--track", "off", "--dtype", "float32", "--json", "r.json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    # the README's key table: ok covers what was checked, complete and tracked say that nothing was
    assert (report["complete"], report["ok"], report["tracked"], report["missing"]) == (None, True, False, [])
    assert any("bfloat16 -> float32" in note for note in report["notes"])
    assert proc.stdout.splitlines()[:2] == [
        f"distload load: NOT TRACKED - {example_copy}",
        "  not tracked (--track off / enable_weights_track false): nothing proves that every tensor was loaded; "
        "ok only says that no check that ran failed"]


def _on_a_tty(*args: str, cwd) -> tuple[int, bytes]:
    """Runs the CLI with stderr on a pseudo-terminal; returns its exit code and what the terminal saw."""
    main, child = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "distload", "--device", "cpu", *args], cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child, timeout=300)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    return proc.returncode, seen


def test_progress_bar_on_a_tty_and_quiet_turns_it_off(tmp_path):
    assert "rank 0 read" not in cli("--device", "cpu", cwd=tmp_path).stderr  # a quick load off a TTY: no lines
    code, seen = _on_a_tty(cwd=tmp_path)
    assert code == 0 and b"distload: rank 0 read" in seen and b"100%" in seen
    code, seen = _on_a_tty("--quiet", cwd=tmp_path)
    assert code == 0 and b"rank 0 read" not in seen


def test_plain_progress_lines_carry_rate_and_eta():
    import io
    from distload.progress import Progress
    out = io.StringIO()
    progress = Progress(out, tty=False, every=0.0)
    for done in (0, 3 * 2**29, 4 * 2**29):
        progress(done, 4 * 2**29)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("distload: rank 0 read 1.50 of 2.00 GiB (75%), ") and "GB/s, ETA " in lines[1]
    assert lines[-1].startswith("distload: rank 0 read 2.00 of 2.00 GiB (100%), ") and "ETA" not in lines[-1]


@pytest.mark.parametrize("args,extra", [(["--read-threads", "3"], {"num_read_threads": 3}),
                                        (["--staging-mib", "64"], {"staging_mib": 64})])
def test_read_options_reach_the_extra_config(monkeypatch, args, extra):
    from distload import __main__ as cli_main, api
    seen = {}

    def fake_load(directory, config, **_):
        seen.update(config.extra_config)
        raise distload.DistloadError("stop here")

    monkeypatch.setattr(api, "load", fake_load)
    assert cli_main.main(["--device", "cpu", "--quiet", *args]) == 1
    assert seen == extra


@pytest.mark.parametrize("args,message", [
    (["--staging-mib", "0"], "distload: error: staging_mib must be a positive integer, got 0"),
    (["--read-threads", "-1"], "distload: error: num_read_threads must be a positive integer, got -1")])
def test_bad_read_options_exit_2_with_one_line(tmp_path, args, message):
    proc = cli("--device", "cpu", *args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message]


@pytest.mark.skipif(shutil.which(TORCHRUN) is None and not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_torchrun_complete_and_incomplete(tmp_path, example_copy):
    def torchrun(*args):
        return subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "distload",
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": _import_path()})

    ok = torchrun("--tp", "2", "--device", "cpu", "--json", "ok.json")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("distload load: COMPLETE") == 1  # only rank 0 prints
    assert json.loads((tmp_path / "ok.json").read_text())["layout"]["world_size"] == 2

    delete_tensors(example_copy, ["model.layers.0.self_attn.k_proj.weight"])
    bad = torchrun(example_copy, "--tp", "2", "--device", "cpu", "--json", "bad.json")
    assert bad.returncode != 0  # torchrun reports a failing worker as its own exit 1
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["complete"] is False  # the CI signal under torchrun
    assert report["missing"] == [{"name": "model.layers.0.self_attn.k_proj.weight", "owners": [0, 1]}]


@pytest.mark.skipif(shutil.which(TORCHRUN) is None and not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_one_process_makes_group_after_group_under_torchrun(tmp_path):
    # torchrun's agent store outlives each group, and torch numbers groups afresh after one is
    # destroyed: without keys of its own, the second group read the first one's gloo addresses
    code = ("import distload; from tests import jobs; "
            "jobs.groups_in_turn(distload.example_checkpoint(), 2, 3)")
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_port()), "--no-python",
                           sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": _import_path()})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_forward_after_the_group_closed_says_what_to_do(pool):
    texts = pool.run(2, jobs.forward_after_close, distload.example_checkpoint(), 2)
    assert all("keep_group=True" in t for t in texts), texts


def _import_path() -> str:
    """PYTHONPATH with this checkout first: torchrun's ranks import distload (and tests) from it
    even where distload is not installed (a CUDA image running the tree as copied)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def _port() -> int:
    from distload.testing import free_port
    return free_port()
