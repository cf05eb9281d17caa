"""Reliability against bad and untrusted checkpoints, at world size 1 (in process) and 4 (pool).

1. A malformed checkpoint fails with a DistloadError subclass naming the file, the tensor
   where there is one, and the rank; at world 4 every rank raises (its own error, or a
   PeerFailedError naming the rank that failed). The CLI prints it as one line, exit 1.
2. ``check_finite`` reports NaN/Inf by checkpoint name and the ranks holding them.
3. Pickle weight files load only when allowed, equal to the safetensors load, and run no code.
4. A load (complete, incomplete or failed) changes nothing on disk and leaves no temp files.

Property tests of the index parser and ``read_header`` are in ``test_fuzz_checkpoints.py``.

Bad checkpoints are edited copies of ``distload.example_checkpoint()`` (bf16 tiny Llama, two
shards and an index): bytes of the safetensors files, or the index / config JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import distload
from distload.checkpoint.directory import INDEX_NAME, MAX_INDEX_BYTES, open_checkpoint
from distload.comm import WorldInfo
from distload.errors import CheckpointError, DistloadError, MissingWeightsError, PlanError
from distload.examples import EXAMPLE_SHARDS, cache_dir
from tests import reliability_jobs
from tests.hf_checkpoints import copy_checkpoint, delete_tensors, read_tensors
from tests.malformed import refusal_and_peak

SHARD1, SHARD2 = EXAMPLE_SHARDS
NORM = "model.norm.weight"  # in SHARD2, replicated on every rank
DOWN0 = "model.layers.0.mlp.down_proj.weight"  # in SHARD1, [64, 128], split along dim 1 (columns)
UP1 = "model.layers.1.mlp.up_proj.weight"  # in SHARD2
EMBED = "model.embed_tokens.weight"  # in SHARD1, [250, 64]
SOLO = WorldInfo(rank=0, world_size=1, local_rank=0)


@pytest.fixture()
def ckpt(example, tmp_path):
    """A fresh copy of the example to damage."""
    return copy_checkpoint(example, str(tmp_path / "ckpt"))


def load1(directory: str, **options) -> distload.Loaded:
    """World size 1, in this process."""
    return distload.load(directory, distload.LoadConfig(device="cpu", **options), world=SOLO)


# ---- editing checkpoints byte by byte ----------------------------------------------------------


def read_st(path: str) -> tuple[dict, bytes]:
    """Returns a safetensors file's header (parsed) and its data area."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: str, header: dict | bytes, data: bytes, *, length: int | None = None) -> None:
    """Writes ``length word | header | data``; the length word is the header's unless given."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def edit_header(path: str, change: Callable[[dict], None]) -> None:
    """Rewrites a header through ``change`` (offsets are relative to the data area: data stays valid)."""
    header, data = read_st(path)
    change(header)
    write_st(path, header, data)


def edit_json(path: str, change: Callable[[dict], None]) -> None:
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def data_start(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def poke(path: str, tensor: str, element: int, value: bytes) -> None:
    """Overwrites one element of a tensor in place (``value``: its raw bytes)."""
    header, _ = read_st(path)
    with open(path, "r+b") as f:
        f.seek(data_start(path) + header[tensor]["data_offsets"][0] + element * len(value))
        f.write(value)


# ---- 1. malformed checkpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The error a bad checkpoint must raise on the rank(s) that find it."""

    cls: type
    file: str
    tensor: str | None
    match: str
    options: dict = field(default_factory=dict)
    """LoadConfig fields the case loads with (CLI: ``flags``)"""
    flags: tuple[str, ...] = ()


def _missing_dir(d):
    shutil.rmtree(d)
    return Expect(CheckpointError, d, None, "checkpoint directory does not exist")


def _empty_dir(d):
    shutil.rmtree(d)
    os.mkdir(d)
    return Expect(CheckpointError, d, None, "checkpoint directory is empty")


def _no_config(d):
    os.remove(os.path.join(d, "config.json"))
    return Expect(CheckpointError, os.path.join(d, "config.json"), None, "config.json is missing")


def _truncated(d):
    path = os.path.join(d, SHARD2)
    size = os.path.getsize(path) // 2  # mid-data: the first tensors are intact, later ones cut
    header, _ = read_st(path)
    data_len = size - data_start(path)
    first_cut = next(n for n, e in header.items() if n != "__metadata__" and e["data_offsets"][1] > data_len)
    os.truncate(path, size)
    return Expect(CheckpointError, path, first_cut, f"run past the end of the data ({data_len} bytes)")


def _header_longer_than_file(d):
    path = os.path.join(d, SHARD1)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", size))  # 8 + size bytes would be needed
    return Expect(CheckpointError, path, None, f"header length {size} is larger than the file ({size} bytes)")


def _absurd_header_length(d):
    path = os.path.join(d, SHARD2)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**62))  # refused before allocating, or this is a MemoryError
    return Expect(CheckpointError, path, None, f"header length {2**62} is larger than the file")


def _header_not_json(d):
    path = os.path.join(d, SHARD1)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b'{"model.embed_tokens.weight": {"dtype": BF16')  # same length word, bytes broken
    return Expect(CheckpointError, path, None, "header is not valid JSON")


def _offsets(tensor: str, offsets: Callable[[list[int], int], list[int]], shard: str = SHARD1):
    """A case that rewrites one tensor's data_offsets with ``offsets(old, data_len)``."""
    def make(d):
        path = os.path.join(d, shard)
        edit_header(path, lambda h: h[tensor].update(data_offsets=offsets(h[tensor]["data_offsets"],
                                                                             os.path.getsize(path) - data_start(path))))
        return path
    return make


def _offsets_overlap(d):
    # gate_proj moved 2 bytes back, into down_proj (its length still matches its shape)
    path = _offsets("model.layers.0.mlp.gate_proj.weight", lambda o, n: [o[0] - 2, o[1] - 2])(d)
    return Expect(CheckpointError, path, "model.layers.0.mlp.gate_proj.weight",
                  f"data_offsets of {DOWN0} and model.layers.0.mlp.gate_proj.weight overlap")


def _offsets_backwards(d):
    path = _offsets("model.layers.0.input_layernorm.weight", lambda o, n: [o[1], o[0]])(d)
    return Expect(CheckpointError, path, "model.layers.0.input_layernorm.weight", "run backwards")


def _offsets_past_end(d):
    path = _offsets("model.layers.0.self_attn.v_proj.weight", lambda o, n: [o[0], n + 64])(d)
    return Expect(CheckpointError, path, "model.layers.0.self_attn.v_proj.weight", "run past the end of the data")


def _unknown_dtype(d):
    path = os.path.join(d, SHARD1)
    edit_header(path, lambda h: h["model.layers.0.self_attn.k_proj.weight"].update(dtype="BF17"))
    return Expect(CheckpointError, path, "model.layers.0.self_attn.k_proj.weight", "unknown dtype 'BF17'")


def _size_mismatch(d):
    path = os.path.join(d, SHARD1)
    edit_header(path, lambda h: h["model.layers.0.self_attn.q_proj.weight"].update(shape=[64, 65]))
    return Expect(CheckpointError, path, "model.layers.0.self_attn.q_proj.weight",
                  "shape [64, 65] x BF16 is 8320 bytes but data_offsets span 8192")


def _set_index_entry(d, tensor: str, rel: str) -> str:
    index = os.path.join(d, INDEX_NAME)
    edit_json(index, lambda v: v["weight_map"].update({tensor: rel}))
    return index


def _index_names_missing_file(d):
    _set_index_entry(d, NORM, "model-00003-of-00003.safetensors")
    return Expect(CheckpointError, os.path.join(d, "model-00003-of-00003.safetensors"), NORM,
                  "the index names model-00003-of-00003.safetensors, which does not exist")


def _index_absolute_path(d):
    real = os.path.join(d, SHARD2)  # exists, and holds the tensor: refused for its form alone
    index = _set_index_entry(d, NORM, real)
    return Expect(CheckpointError, index, NORM, f"index entry {real!r} is an absolute path or leaves the directory")


def _index_leaves_directory(d):
    outside = copy_checkpoint(d, d + "-outside")  # a real shard exists where '..' leads
    index = _set_index_entry(d, NORM, f"../{os.path.basename(outside)}/{SHARD2}")
    return Expect(CheckpointError, index, NORM, "is an absolute path or leaves the directory")


def _index_dotdot_inside(d):
    # leaves and re-enters the directory: resolves inside, refused all the same, on the normalized text
    # ('sub/../x' normalizes to 'x' and is accepted: tests/test_format_exactness.py)
    rel = f"sub/../../{os.path.basename(d)}/{SHARD2}"
    index = _set_index_entry(d, NORM, rel)
    return Expect(CheckpointError, index, NORM, f"index entry {rel!r} is an absolute path")


def _tensor_in_two_files(d):
    path1, path2 = os.path.join(d, SHARD1), os.path.join(d, SHARD2)
    h2, data2 = read_st(path2)
    b, e = h2[NORM]["data_offsets"]
    h1, data1 = read_st(path1)
    h1[NORM] = {**h2[NORM], "data_offsets": [len(data1), len(data1) + e - b]}
    write_st(path1, h1, data1 + data2[b:e])  # the index still places it in SHARD2 only
    return Expect(CheckpointError, path2, NORM, f"tensor is stored twice, also in {path1}")


def _index_places_tensor_wrongly(d):
    _set_index_entry(d, NORM, SHARD1)
    return Expect(CheckpointError, os.path.join(d, SHARD1), NORM,
                  f"the index places this tensor in {SHARD1}, which does not hold it")


def _vocab_differs_from_config(d):
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(vocab_size=256))  # checkpoint has 250
    return Expect(PlanError, os.path.join(d, SHARD1), EMBED, "checkpoint shape [250, 64] differs from the model's [256, 64]")


def _float32_tensor(d):
    path = os.path.join(d, SHARD2)
    tensors = load_file(path)
    tensors[UP1] = tensors[UP1].float()  # exact: every bf16 value is a float32 value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _strict_dtype(d):
    path = _float32_tensor(d)
    return Expect(PlanError, path, UP1, "checkpoint dtype float32 differs from the model's bfloat16 "
                  "(parameter model.layers.1.mlp.gate_up_proj.weight); --strict-dtype refuses to cast",
                  options={"strict_dtype": True}, flags=("--strict-dtype",))


CASES = {f.__name__.lstrip("_"): f for f in (
    _missing_dir, _empty_dir, _no_config, _truncated, _header_longer_than_file, _absurd_header_length,
    _header_not_json, _offsets_overlap, _offsets_backwards, _offsets_past_end, _unknown_dtype, _size_mismatch,
    _index_names_missing_file, _index_absolute_path, _index_leaves_directory, _index_dotdot_inside,
    _tensor_in_two_files, _index_places_tensor_wrongly, _vocab_differs_from_config, _strict_dtype)}


def check_own_error(err: DistloadError, expect: Expect, rank: int) -> None:
    """The error a rank raised itself: class, file, tensor, rank, and all three in its text."""
    assert type(err) is expect.cls, (type(err), str(err))
    assert (err.file, err.tensor, err.rank) == (expect.file, expect.tensor, rank), str(err)
    assert expect.match in err.message, err.message
    text = str(err)
    assert f"file {expect.file}" in text and f"rank {rank}" in text, text
    assert expect.tensor is None or f"tensor {expect.tensor}" in text, text


def check_every_rank_failed(out: list[dict], expect: Expect | list[Expect]) -> None:
    """Every rank failed: with the expected error itself, or with a PeerFailedError naming a rank
    that did (and carrying that rank's file and tensor)."""
    expects = expect if isinstance(expect, list) else [expect] * len(out)
    own = [r for r, o in enumerate(out) if o["type"] != "PeerFailedError"]
    assert own, out
    for r, o in enumerate(out):
        assert not o["ok"], (r, o)
        if o["type"] == "PeerFailedError":
            failed = o["failed_rank"]
            assert failed in own and o["rank"] == failed, (r, o)
            assert (o["file"], o["tensor"]) == (out[failed]["file"], out[failed]["tensor"]), (r, o)
            assert expects[failed].match in o["message"], (r, o)
            continue
        e = expects[r]
        assert o["type"] == e.cls.__name__, (r, o)
        assert (o["file"], o["tensor"], o["rank"]) == (e.file, e.tensor, r), (r, o)
        assert e.match in o["message"] and f"file {e.file}" in o["text"] and f"rank {r}" in o["text"], (r, o)


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_at_world_1(ckpt, case):
    expect = CASES[case](ckpt)
    start = time.monotonic()
    with pytest.raises(DistloadError) as info:
        load1(ckpt, **expect.options)
    check_own_error(info.value, expect, 0)
    assert time.monotonic() - start < 10  # an absurd header length is refused, not allocated or read


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_at_world_4(pool, ckpt, case):
    expect = CASES[case](ckpt)
    tp = 4 if list(CASES).index(case) % 2 else 2
    check_every_rank_failed(pool.run(4, reliability_jobs.outcome, ckpt, tp, expect.options), expect)


def _pickle_only(d):
    shutil.rmtree(d)
    pickle_checkpoint(distload.example_checkpoint(), d)
    return Expect(CheckpointError, d, None, "pass --allow-pickle-format to load them with torch.load(weights_only=True)")


# a few of CASES (each run costs a Python start and a torch import), and a pickle-only checkpoint
CLI_CASES = ("truncated", "absurd_header_length", "index_leaves_directory", "strict_dtype", "pickle_only")


def test_cli_prints_one_line_naming_file_tensor_and_rank(example, tmp_path):
    """``python -m distload CKPT --device cpu``: exit 1 and one ``distload: error:`` line (runs concurrently)."""
    procs = {}
    for case in CLI_CASES:
        d = copy_checkpoint(example, str(tmp_path / case))
        expect = {**CASES, "pickle_only": _pickle_only}[case](d)
        procs[case] = (expect, subprocess.Popen([sys.executable, "-m", "distload", d, "--device", "cpu", *expect.flags],
                                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for case, (expect, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (case, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("distload: error: "), (case, err)
        assert expect.match in lines[0] and f"file {expect.file}" in lines[0] and "rank 0" in lines[0], (case, err)
        assert expect.tensor is None or f"tensor {expect.tensor}" in lines[0], (case, err)
        assert out == "", (case, out)


def _shrinking(directory: str) -> Expect:
    return Expect(CheckpointError, os.path.join(directory, SHARD2), NORM, "is it truncated?")


def test_file_that_shrinks_after_its_header_was_read(example, tmp_path, pool):
    """The executor's reads hit the end of a file cut after planning: named, never a short tensor."""
    size = os.path.getsize(os.path.join(example, SHARD2)) - 64  # the last tensor (model.norm.weight) loses its tail
    d = copy_checkpoint(example, str(tmp_path / "one"))
    out = reliability_jobs.outcome(d, 1, truncate={"file": SHARD2, "size": size})
    assert out["type"] == "CheckpointError" and out["rank"] == 0
    assert (out["file"], out["tensor"]) == (os.path.join(d, SHARD2), NORM) and "is it truncated?" in out["message"]
    dirs = [copy_checkpoint(example, str(tmp_path / f"rank{r}")) for r in range(4)]  # one copy per rank
    out = pool.run(4, reliability_jobs.outcome_with, dirs, 2, None, {"truncate": {"file": SHARD2, "size": size}})
    check_every_rank_failed(out, [_shrinking(d) for d in dirs])


def test_index_over_the_size_limit_is_refused_before_reading(ckpt):
    index = os.path.join(ckpt, INDEX_NAME)
    os.truncate(index, MAX_INDEX_BYTES + 1)  # sparse: reading it would be the bug
    err, peak = refusal_and_peak(lambda: open_checkpoint(ckpt))
    assert err.file == index and f"over the {MAX_INDEX_BYTES}-byte limit" in err.message
    assert peak < 4 * 2**20, peak


# ---- files that load: symlinks, casts ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference(example, pool):
    """Digests of every rank's parameters after loading the example: world 1, and world 4 at tp=2."""
    one = reliability_jobs.outcome(example, 1, digests=True)
    four = pool.run(4, reliability_jobs.outcome_with, example, 2, None, {"digests": True})
    assert one["ok"] and all(o["ok"] for o in four)
    return {1: [one["digests"]], 4: [o["digests"] for o in four]}


def run_both(pool, directory: str, options: dict | None = None) -> dict[int, list[dict]]:
    """Loads ``directory`` at world 1 (here) and 4 (tp=2, pool), returning each rank's outcome."""
    return {1: [reliability_jobs.outcome(directory, 1, options, digests=True)],
            4: pool.run(4, reliability_jobs.outcome_with, directory, 2, options, {"digests": True})}


def hf_cache_layout(example: str, root: str) -> str:
    """Lays the example out as the Hugging Face cache does: snapshot files are relative symlinks to
    content-addressed blobs in another directory. Returns the snapshot directory."""
    blobs = os.path.join(root, "blobs")
    snapshot = os.path.join(root, "snapshots", "0123abcd")
    os.makedirs(blobs)
    os.makedirs(snapshot)
    for name in os.listdir(example):
        with open(os.path.join(example, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.copyfile(os.path.join(example, name), os.path.join(blobs, digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    return snapshot


def test_symlinked_weight_files_are_followed(example, tmp_path, pool, reference):
    snapshot = hf_cache_layout(example, str(tmp_path / "models--tiny"))
    assert all(os.path.islink(os.path.join(snapshot, n)) for n in os.listdir(snapshot))
    for world, outs in run_both(pool, snapshot).items():
        for o, ref in zip(outs, reference[world]):
            assert o["ok"] and o["report"]["complete"] is True, o
            assert o["digests"] == ref


def test_other_dtype_is_cast_with_a_note_and_refused_under_strict_dtype(ckpt, pool, reference):
    _float32_tensor(ckpt)
    for world, outs in run_both(pool, ckpt).items():
        for o, ref in zip(outs, reference[world]):
            assert o["ok"] and o["report"]["complete"] is True, o
            assert o["report"]["notes"] == ["cast float32 -> bfloat16 while loading (model dtype differs from the "
                                            "checkpoint's)"], o["report"]["notes"]
            assert o["digests"] == ref  # the values are the bf16 ones, exactly
    # refusal under strict_dtype: the world-1/world-4 case tests above ('strict_dtype')


# ---- 2. --check-finite -------------------------------------------------------------------------

BF16_NAN, BF16_INF = b"\xc0\x7f", b"\x80\x7f"
NAN_COLUMN = 100  # of DOWN0's 128 columns: tp=2 rank 1 holds 64-127, tp=4 rank 3 holds 96-127


def put_nonfinite(directory: str) -> None:
    """One NaN in DOWN0 (row 5, column NAN_COLUMN), one +Inf in the replicated final norm."""
    poke(os.path.join(directory, SHARD1), DOWN0, 5 * 128 + NAN_COLUMN, BF16_NAN)
    poke(os.path.join(directory, SHARD2), NORM, 3, BF16_INF)


def expected_nonfinite(world: int, tp: int) -> dict[str, dict]:
    ranks = list(range(world))
    holds_column = [r for r in ranks if r % tp == NAN_COLUMN // (128 // tp)]  # TP index innermost
    return {DOWN0: {"name": DOWN0, "owners": ranks, "found_on": holds_column},
            NORM: {"name": NORM, "owners": ranks, "found_on": ranks}}


@pytest.mark.parametrize("world, tp", [(1, 1), (4, 2), (4, 4)])
def test_check_finite_names_the_tensor_and_the_ranks_holding_it(ckpt, pool, world, tp):
    put_nonfinite(ckpt)
    assert expected_nonfinite(4, 2)[DOWN0]["found_on"] == [1, 3]  # the column decides
    want = expected_nonfinite(world, tp)

    def run(options):
        if world == 1:
            return [reliability_jobs.outcome(ckpt, 1, options)]
        return pool.run(world, reliability_jobs.outcome, ckpt, tp, options)

    for o in run({"check_finite": True}):  # reported; the load stays complete and usable
        assert o["ok"] and o["report"]["complete"] is True and o["report"]["ok"] is True, o
        assert {e["name"]: e for e in o["report"]["nonfinite"]} == want
    for o in run({"check_finite": True, "strict": True}):  # fails under strict, with the report
        assert o["type"] == MissingWeightsError.__name__ and "2 with NaN/Inf under --strict" in o["message"], o
        assert o["report"]["complete"] is True and o["report"]["ok"] is False
        assert {e["name"]: e for e in o["report"]["nonfinite"]} == want
    for o in run({"strict": True}):  # not scanned: nothing reported
        assert o["ok"] and o["report"]["nonfinite"] == [], o


def test_check_finite_on_the_command_line(ckpt, tmp_path):
    put_nonfinite(ckpt)
    runs = {"report": ["--check-finite", "--json", "r.json"], "strict": ["--check-finite", "--strict"]}
    procs = {k: subprocess.Popen([sys.executable, "-m", "distload", ckpt, "--device", "cpu", *args], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, args in runs.items()}
    done = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    (out, err), code = done["report"]
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert {e["name"]: e for e in report["nonfinite"]} == expected_nonfinite(1, 1)
    assert f"{DOWN0}  (owner ranks 0; NaN/Inf on 0)" in out
    (out, err), code = done["strict"]
    assert code == 3, err
    assert "INCOMPLETE" not in out and "nonfinite (2):" in out


# ---- 3. no code from checkpoints ---------------------------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command (what a malicious pickle weight file does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def pickle_checkpoint(example: str, directory: str, *, legacy: bool = False) -> str:
    os.mkdir(directory)
    shutil.copyfile(os.path.join(example, "config.json"), os.path.join(directory, "config.json"))
    path = os.path.join(directory, "pytorch_model.bin")
    torch.save(read_tensors(example), path, _use_new_zipfile_serialization=not legacy)
    return directory


def malicious_checkpoint(example: str, directory: str, marker: str, how: str) -> str:
    """A pickle weight file whose unpickling would create ``marker``, proven to do so when loaded
    unsafely (then the marker is removed)."""
    os.mkdir(directory)
    shutil.copyfile(os.path.join(example, "config.json"), os.path.join(directory, "config.json"))
    path = os.path.join(directory, "pytorch_model.bin")
    state = {**read_tensors(example), "model.norm.weight": RunsCode(marker)}
    if how == "torch.save":
        torch.save(state, path)
        torch.load(path, weights_only=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
        with open(path, "rb") as f:
            pickle.load(f)
    assert os.path.exists(marker)  # the bomb is real
    os.remove(marker)
    return directory


def test_pickle_only_checkpoint_is_refused_without_allow_pickle_format(ckpt, pool):
    expect = _pickle_only(ckpt)
    with pytest.raises(DistloadError) as info:
        load1(ckpt)
    check_own_error(info.value, expect, 0)
    check_every_rank_failed(pool.run(4, reliability_jobs.outcome, ckpt, 4), expect)
    # the command line: CLI_CASES 'pickle_only'


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_allowed_pickle_loads_exactly_like_safetensors(example, tmp_path, pool, reference, legacy):
    d = pickle_checkpoint(example, str(tmp_path / "pkl"), legacy=legacy)
    outs = run_both(pool, d, {"allow_pickle_format": True}) if not legacy else \
        {1: [reliability_jobs.outcome(d, 1, {"allow_pickle_format": True}, digests=True)]}
    for world, per_rank in outs.items():
        for o, ref in zip(per_rank, reference[world]):
            assert o["ok"] and o["report"]["complete"] is True, o
            assert o["digests"] == ref


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, reading the plain pickle
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(example, tmp_path, pool, how):
    marker = str(tmp_path / "PWNED")
    d = malicious_checkpoint(example, str(tmp_path / "evil"), marker, how)
    path = os.path.join(d, "pytorch_model.bin")
    expect = Expect(CheckpointError, path, None, "refused: the pickle holds more than plain tensors (weights_only)")
    with pytest.raises(DistloadError) as info:
        load1(d, allow_pickle_format=True)
    check_own_error(info.value, expect, 0)
    assert "weights_only=False" not in info.value.message  # torch's advice to run it anyway is cut
    if how == "torch.save":  # (a plain pickle stops earlier, at an opcode torch's unpickler lacks)
        assert "unsupported GLOBAL posix.system" in info.value.message  # names what it refused to call
    if how == "torch.save":
        check_every_rank_failed(pool.run(4, reliability_jobs.outcome, d, 2, {"allow_pickle_format": True}), expect)
    assert not os.path.exists(marker)


def test_safetensors_win_over_pickle_files(ckpt, tmp_path, pool, reference):
    """A .bin beside the safetensors is never opened: even a malicious one, even when pickles are allowed."""
    marker = str(tmp_path / "PWNED")
    evil = malicious_checkpoint(distload.example_checkpoint(), str(tmp_path / "evil"), marker, "torch.save")
    shutil.copyfile(os.path.join(evil, "pytorch_model.bin"), os.path.join(ckpt, "pytorch_model.bin"))
    with open(os.path.join(ckpt, "model.pt"), "wb") as f:
        f.write(b"\x80\x04garbage, not a pickle at all" + bytes(range(256)))
    for options in (None, {"allow_pickle_format": True}):
        for world, outs in run_both(pool, ckpt, options).items():
            for o, ref in zip(outs, reference[world]):
                assert o["ok"] and o["report"]["complete"] is True, o
                assert o["digests"] == ref
    assert not os.path.exists(marker)


# ---- 4. nothing touched ------------------------------------------------------------------------


def snapshot(root: str) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): kind, size, mtime_ns, and content sha256 or
    link target; directories' mtime_ns changes when an entry is created or removed in them."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (".", *dirnames, *filenames):
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path), st.st_mtime_ns)
            elif os.path.isdir(path):
                out[path] = ("dir", sorted(os.listdir(path)), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[path] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


# Entries other processes on this machine make in the system temp dir while the tests run (other
# test sessions' tempfile.mkdtemp names, multiprocessing's per-process ``pymp-*`` directories, shell
# tool scratch). distload's own temp files cannot hide among them: every load here runs with
# tempfile's directory and $TMPDIR pointed at a private, checked-empty directory, so a
# ``tmpXXXXXXXX`` or ``pymp-XXXXXXXX`` made during the load would land there instead.
TEMP_NOISE = re.compile(r"^(tmp[a-z0-9_]{8}|tmp\.[A-Za-z0-9]{10}|pymp-[a-z0-9_]{8}|bash_tool_.*|pytest-of-.*)$")


def new_temp_entries(before: set[str]) -> set[str]:
    return {n for n in set(os.listdir(tempfile.gettempdir())) - before if not TEMP_NOISE.match(n)}


def _untouched_case(example, base):
    """name -> (world, tp, make(directory) -> (directory, options, outcome check))."""
    def ok(o):
        assert o["ok"] and o["report"]["complete"] is True, o

    def missing(o):
        assert o["type"] == MissingWeightsError.__name__ and [e["name"] for e in o["report"]["missing"]] == [NORM], o

    def failed(o):
        assert not o["ok"] and o["type"] in ("CheckpointError", "PeerFailedError"), o

    def copy(name, change=None):
        d = copy_checkpoint(example, os.path.join(base, name))
        if change:
            change(d)
        return d

    return {
        "example-complete-1": (1, 1, lambda: (example, {}, {}, ok)),
        "complete-4": (4, 2, lambda: (copy("c"), {}, {}, ok)),
        "missing-1": (1, 1, lambda: (copy("m", lambda d: delete_tensors(d, [NORM])), {}, {}, missing)),
        "missing-4": (4, 4, lambda: (copy("m", lambda d: delete_tensors(d, [NORM])), {}, {}, missing)),
        "failing-rank-4": (4, 2, lambda: (copy("f"), {}, {"fail_rank": 2}, failed)),
        "bad-header-1": (1, 1, lambda: (copy("b", _unknown_dtype), {}, {}, failed)),
        "bad-header-4": (4, 2, lambda: (copy("b", _unknown_dtype), {}, {}, failed)),
        "pickle-1": (1, 1, lambda: (pickle_checkpoint(example, os.path.join(base, "p")),
                                    {"allow_pickle_format": True}, {}, ok)),
    }


UNTOUCHED = ("example-complete-1", "complete-4", "missing-1", "missing-4", "failing-rank-4", "bad-header-1",
             "bad-header-4", "pickle-1")


@pytest.mark.parametrize("case", UNTOUCHED)
def test_a_load_changes_nothing_on_disk(example, tmp_path, pool, case):
    world, tp, make = _untouched_case(example, str(tmp_path))[case]
    directory, options, extra, check = make()
    private_tmp = str(tmp_path / "private-tmp")
    os.mkdir(private_tmp)
    before = (snapshot(directory), snapshot(cache_dir()), set(os.listdir(tempfile.gettempdir())))
    if world == 1:
        outs = [reliability_jobs.outcome(directory, 1, options, tmpdir=private_tmp, **extra)]
    else:
        outs = pool.run(world, reliability_jobs.outcome_with, directory, tp, options, {"tmpdir": private_tmp, **extra})
    for o in outs:
        check(o)
    assert snapshot(directory) == before[0]
    assert snapshot(cache_dir()) == before[1]  # no half-written example, no lock or temp files
    assert os.listdir(private_tmp) == []
    assert new_temp_entries(before[2]) == set()
