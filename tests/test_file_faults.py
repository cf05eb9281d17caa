"""Filesystem faults: only regular files are opened, nothing blocks, and every OSError on any path
of a checkpoint is one CheckpointError line naming the file (and the tensor, when reading data).

Faults made after planning (a shard deleted, or swapped for a FIFO) go through ``distload.load``
in this process (world 1) and through the pool (world 4). Calls that would block on a FIFO
if the fix regressed run in a thread with a deadline, which then unblocks them.
"""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

import distload
from distload.checkpoint import files
from distload.checkpoint.directory import INDEX_NAME, open_checkpoint
from distload.checkpoint.header import read_header
from distload.errors import CheckpointError
from distload.examples import EXAMPLE_NAME, EXAMPLE_SHARDS, example_checkpoint
from distload.models import reference_model
from tests import file_fault_jobs
from tests.hf_checkpoints import copy_checkpoint

SHARD1, SHARD2 = EXAMPLE_SHARDS
FIFO_REFUSAL = "it is a FIFO, not a regular file"


@pytest.fixture()
def ckpt(example, tmp_path):
    return copy_checkpoint(example, str(tmp_path / "ckpt"))


def single(tmp_path) -> str:
    """A one-file checkpoint directory."""
    d = tmp_path / "single"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.zeros(2)}, str(d / "model.safetensors"))
    return str(d)


def bounded(fn, *fifos: str, seconds: float = 60.0) -> BaseException | None:
    """Runs ``fn`` in a thread; returns what it raised. If it is still running after ``seconds``
    (blocked on a FIFO), opens each FIFO for writing to let it go, and fails the test."""
    raised: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as err:  # handed to the test thread
            raised.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"{fn} blocked for {seconds} s")
    return raised[0] if raised else None


def refused(fn, *fifos: str) -> CheckpointError:
    err = bounded(fn, *fifos)
    assert isinstance(err, CheckpointError), repr(err)
    assert "\n" not in str(err)
    return err


def check(err: CheckpointError, message: str, file: str, tensor: str | None = None) -> None:
    assert (err.message, err.file, err.tensor) == (message, file, tensor), str(err)
    assert f"file {file}" in str(err)


# ---- not regular files -------------------------------------------------------------------------


def test_fifo_named_model_safetensors_is_refused_without_blocking(tmp_path):
    d = single(tmp_path)
    path = os.path.join(d, "model.safetensors")
    os.remove(path)
    os.mkfifo(path)
    check(refused(lambda: open_checkpoint(d), path), f"cannot read safetensors file: {FIFO_REFUSAL}", path)


def test_fifo_swapped_in_after_the_stat_does_not_block_the_open(tmp_path, monkeypatch):
    """The non-blocking open and its fstat refuse a FIFO the stat never saw."""
    path = str(tmp_path / "m.safetensors")
    os.mkfifo(path)
    monkeypatch.setattr(files, "require_regular", lambda *args, **kwargs: None)
    check(refused(lambda: files.open_regular(path, what="safetensors file"), path),
          f"cannot read safetensors file: {FIFO_REFUSAL}", path)


def test_device_linked_as_a_weight_file_is_refused(tmp_path):
    d = single(tmp_path)
    path = os.path.join(d, "model.safetensors")
    os.remove(path)
    os.symlink("/dev/zero", path)
    check(refused(lambda: open_checkpoint(d)), "cannot read safetensors file: it is a character device, "
          "not a regular file", path)


def test_dangling_symlink_as_a_weight_file(tmp_path):
    d = single(tmp_path)
    path = os.path.join(d, "model.safetensors")
    os.remove(path)
    os.symlink(str(tmp_path / "gone.safetensors"), path)
    check(refused(lambda: open_checkpoint(d)), "cannot read safetensors file: No such file or directory", path)


def test_fifo_named_config_json(tmp_path):
    d = single(tmp_path)
    path = os.path.join(d, "config.json")
    os.remove(path)
    os.mkfifo(path)
    check(refused(lambda: open_checkpoint(d), path), f"cannot read config.json: {FIFO_REFUSAL}", path)


def test_fifo_named_like_the_index(ckpt):
    path = os.path.join(ckpt, INDEX_NAME)
    os.remove(path)
    os.mkfifo(path)
    check(refused(lambda: open_checkpoint(ckpt), path), f"cannot read index: {FIFO_REFUSAL}", path)


def test_index_naming_a_directory(ckpt):
    index = os.path.join(ckpt, INDEX_NAME)
    value = json.load(open(index))
    value["weight_map"]["model.norm.weight"] = "sub"
    json.dump(value, open(index, "w"))
    os.mkdir(os.path.join(ckpt, "sub"))
    check(refused(lambda: open_checkpoint(ckpt)), "cannot read safetensors file: it is a directory, not a "
          "regular file", os.path.join(ckpt, "sub"))


def test_fifo_as_the_only_pickle_file(tmp_path):
    d = tmp_path / "pickles"
    d.mkdir()
    (d / "config.json").write_text("{}")
    path = str(d / "pytorch_model.bin")
    os.mkfifo(path)
    check(refused(lambda: open_checkpoint(str(d), allow_pickle=True), path),
          f"cannot read pickle weight file: {FIFO_REFUSAL}", path)


def test_checkpoint_path_that_is_a_file(tmp_path):
    path = os.path.join(single(tmp_path), "config.json")
    check(refused(lambda: open_checkpoint(path)), "checkpoint path is a regular file, not a directory", path)


# ---- directories that cannot be listed ---------------------------------------------------------


def test_directory_that_can_be_entered_but_not_listed(tmp_path, monkeypatch):
    d = single(tmp_path)
    os.chmod(d, 0o111)
    try:
        try:
            os.listdir(d)
        except PermissionError:
            pass
        else:  # root reads it all the same: list as an unprivileged user would
            real = os.listdir

            def listdir(path="."):
                if os.fspath(path) == d:
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return real(path)
            monkeypatch.setattr(os, "listdir", listdir)
        check(refused(lambda: open_checkpoint(d)), "cannot list the checkpoint directory: Permission denied", d)
    finally:
        os.chmod(d, 0o755)


# ---- faults between the header read and the data read ------------------------------------------


def load_damaged(directory: str, file: str, how: str):
    """``distload.load`` at world 1, ``file`` damaged once the headers were read."""
    def build(ctx):
        file_fault_jobs.damage(os.path.join(directory, file), how)
        return reference_model(ctx)
    return lambda: distload.load(directory, distload.LoadConfig(device="cpu"), build=build)


@pytest.mark.parametrize("how, reason", [
    ("delete", "No such file or directory"), ("fifo", FIFO_REFUSAL)])
def test_shard_damaged_after_planning_names_file_and_tensor(example, ckpt, how, reason):
    path = os.path.join(ckpt, SHARD2)
    err = refused(load_damaged(ckpt, SHARD2, how), path)
    assert err.message == f"cannot read safetensors file: {reason} (its header was read earlier: did it change since?)"
    assert (err.file, err.rank) == (path, 0) and err.tensor in read_header(os.path.join(example, SHARD2))
    assert f"tensor {err.tensor}" in str(err)


def test_shard_deleted_after_planning_at_world_4(example, tmp_path, pool):
    """Rank 2's copy loses a shard: rank 2 names it, the others name rank 2, every rank stops."""
    dirs = [copy_checkpoint(example, str(tmp_path / f"rank{r}")) for r in range(4)]
    out = pool.run(4, file_fault_jobs.load_damaged, dirs, 2, SHARD2, "delete", [2])
    failed = out[2]
    assert failed["type"] == "CheckpointError" and failed["rank"] == 2, failed
    assert failed["message"] == ("cannot read safetensors file: No such file or directory (its header was read "
                                 "earlier: did it change since?)")
    assert failed["file"] == os.path.join(dirs[2], SHARD2) and failed["tensor"] in read_header(
        os.path.join(example, SHARD2))
    for r in (0, 1, 3):
        assert out[r]["type"] == "PeerFailedError" and out[r]["failed_rank"] == 2, out[r]
        assert (out[r]["file"], out[r]["tensor"]) == (failed["file"], failed["tensor"]), out[r]


# ---- the bundled example's cache ---------------------------------------------------------------


def test_cache_that_is_a_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    monkeypatch.setenv("DISTLOAD_CACHE", str(cache))
    check(refused(example_checkpoint), "cannot write the example checkpoint into its cache directory: it exists "
          "and is not a directory (set DISTLOAD_CACHE to a writable directory)", str(cache))


def test_cache_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    cache = str(tmp_path / "file" / "cache")
    monkeypatch.setenv("DISTLOAD_CACHE", cache)
    check(refused(example_checkpoint), "cannot write the example checkpoint into its cache directory: Not a "
          "directory (set DISTLOAD_CACHE to a writable directory)", cache)


def test_cache_that_is_not_writable(tmp_path, monkeypatch):
    cache = tmp_path / "ro"
    cache.mkdir()
    os.chmod(cache, 0o555)
    monkeypatch.setenv("DISTLOAD_CACHE", str(cache))
    try:
        if os.access(cache, os.W_OK):  # root writes it all the same: fail the write as for a user
            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(cache))
            monkeypatch.setattr("tempfile.mkdtemp", refuse)
        check(refused(example_checkpoint), "cannot write the example checkpoint into its cache directory: "
              "Permission denied (set DISTLOAD_CACHE to a writable directory)", str(cache))
        assert os.listdir(cache) == []
    finally:
        os.chmod(cache, 0o755)


def test_cache_whose_disk_fills_up(tmp_path, monkeypatch):
    """A write failing midway leaves no partial example behind, and says why."""
    monkeypatch.setenv("DISTLOAD_CACHE", str(tmp_path / "cache"))

    def full(directory):
        open(os.path.join(directory, "config.json"), "w").close()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("distload.examples.write_example", full)
    check(refused(example_checkpoint), "cannot write the example checkpoint into its cache directory: No space "
          "left on device (set DISTLOAD_CACHE to a writable directory)", str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []
    assert not os.path.exists(tmp_path / "cache" / EXAMPLE_NAME)
