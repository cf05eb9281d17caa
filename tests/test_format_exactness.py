"""distload accepts exactly the safetensors files the safetensors library accepts.

Every file of ``tests/malformed.py`` goes through ``safetensors.torch.load_file`` and through
distload's ``read_header``: both accept or both refuse, and for the main kinds distload's
one-line message is pinned. A hypothesis property does the same for near-valid files, and
directory-level tests cover what only a directory has: index paths, normalized.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.torch import save_file

from distload.checkpoint.directory import open_checkpoint
from distload.checkpoint.header import MAX_HEADER_BYTES, read_file_header, read_header
from distload.errors import CheckpointError
from tests.malformed import CASES, Case, blob, json_headers, library_refusal, near_valid_files


def distload_refusal(path: str) -> CheckpointError | None:
    try:
        read_header(path)
    except CheckpointError as err:
        return err
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict_agrees_with_the_safetensors_library(tmp_path, case: Case):
    path = str(tmp_path / "model.safetensors")
    with open(path, "wb") as f:
        f.write(case.data)
    theirs, ours = library_refusal(path), distload_refusal(path)
    assert (theirs is None) == (ours is None), f"safetensors: {theirs}; distload: {ours}"
    if ours is not None:
        assert ours.file == path and ours.tensor == case.tensor, str(ours)
        assert str(ours).count("\n") == 0
    if case.message is not None:
        assert ours is not None and ours.message == case.message


def test_the_battery_holds_both_verdicts():
    """A comparison that could only ever see refusals (or only acceptances) would prove nothing."""
    kinds = {c.message is None and c.tensor is None for c in CASES}
    assert kinds == {True, False} and sum(1 for c in CASES if c.message) >= 30


@settings(max_examples=int(os.environ.get("DISTLOAD_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=near_valid_files() | json_headers())
def test_near_valid_files_get_the_library_verdict(tmp_path, data):
    path = str(tmp_path / "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    theirs, ours = library_refusal(path), distload_refusal(path)
    assert (theirs is None) == (ours is None), f"safetensors: {theirs}; distload: {ours}"


def test_accepted_files_read_the_same_tensors_as_the_library(tmp_path):
    """Where both accept, names, dtypes, shapes and bytes agree (F4 halved as torch holds it)."""
    compared = 0
    for case in CASES:
        path = str(tmp_path / f"{compared}.safetensors")
        with open(path, "wb") as f:
            f.write(case.data)
        if library_refusal(path) is not None:
            continue
        with safe_open(path, "pt") as f:
            theirs = {n: f.get_tensor(n) for n in f.keys()}
        ours = read_header(path)
        assert set(ours) == set(theirs), case.name
        for name, info in ours.items():
            t = theirs[name]
            assert (info.dtype, info.shape) == (t.dtype, tuple(t.shape)), (case.name, name)
            assert case.data[info.begin:info.end] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        compared += 1
    assert compared >= 25


def test_metadata_and_size_are_kept(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(3)}, path, metadata={"format": "pt", "note": "x"})
    header = read_file_header(path)
    assert header.metadata == {"format": "pt", "note": "x"} and header.size == os.path.getsize(path)


def test_header_over_the_format_limit_is_refused_before_reading(tmp_path):
    """A sparse file large enough to hold the header: refused for the limit alone, nothing read."""
    path = str(tmp_path / "m.safetensors")
    with open(path, "wb") as f:
        f.write(blob(b"{}", length=MAX_HEADER_BYTES + 1))
    os.truncate(path, MAX_HEADER_BYTES + 64)
    assert library_refusal(path) is not None
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert info.value.message == (f"header length {MAX_HEADER_BYTES + 1} is larger than the safetensors format's "
                                  f"limit of {MAX_HEADER_BYTES} bytes")


# ---- index paths -------------------------------------------------------------------------------


def indexed(tmp_path, weight_map: dict[str, str]) -> str:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(d / "m-1.safetensors"))
    save_file({"c": torch.zeros(4)}, str(d / "sub" / "m-2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(d)


@pytest.mark.parametrize("spellings", [
    ("m-1.safetensors", "./m-1.safetensors"),
    ("./m-1.safetensors", "sub/../m-1.safetensors"),
    ("m-1.safetensors", "missing/../m-1.safetensors"),
    ("m-1.safetensors", ".//m-1.safetensors"),
], ids=["dot", "dot-dot", "missing-dir", "double-slash"])
def test_one_file_spelled_two_ways_in_the_index_is_one_file(tmp_path, spellings):
    d = indexed(tmp_path, {"a": spellings[0], "b": spellings[1], "c": "sub/./m-2.safetensors"})
    ckpt = open_checkpoint(d)
    assert ckpt.files == (os.path.join(d, "m-1.safetensors"), os.path.join(d, "sub", "m-2.safetensors"))
    assert ckpt.tensors["b"].file == os.path.join(d, "m-1.safetensors")
    assert ckpt.sizes[ckpt.files[0]] == os.path.getsize(ckpt.files[0])


@pytest.mark.parametrize("rel", ["sub/../../ckpt/m-1.safetensors", "./../ckpt/m-1.safetensors", ".", "sub/..",
                                 "/abs/m-1.safetensors", ""])
def test_index_paths_that_leave_the_directory_after_normalizing_are_refused(tmp_path, rel):
    d = indexed(tmp_path, {"a": "m-1.safetensors", "b": rel, "c": "sub/m-2.safetensors"})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(d)
    err = info.value
    assert err.message == f"index entry {rel!r} is an absolute path or leaves the directory"
    assert (err.file, err.tensor) == (os.path.join(d, "model.safetensors.index.json"), "b")
