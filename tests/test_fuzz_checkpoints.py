"""Property tests: the index parser, ``open_checkpoint`` and ``read_header`` reject any input
with CheckpointError only, naming the file; an index entry that leaves the checkpoint's
directory is refused even where a real file lies there (``DISTLOAD_FUZZ_EXAMPLES`` examples per
property, 200 by default).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import example as known_input
from hypothesis import strategies as st

from distload.checkpoint.directory import INDEX_NAME, open_checkpoint, parse_index
from distload.checkpoint.header import MAX_HEADER_BYTES, read_header
from distload.errors import CheckpointError
from distload.examples import EXAMPLE_SHARDS, example_tensors
from tests.hf_checkpoints import copy_checkpoint
from tests.malformed import refusal_and_peak

SHARD1, SHARD2 = EXAMPLE_SHARDS

FUZZ_EXAMPLES = int(os.environ.get("DISTLOAD_FUZZ_EXAMPLES", "200"))
"""examples per property; CI runs 200, a long local run e.g. DISTLOAD_FUZZ_EXAMPLES=20000"""
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)
file_names = st.sampled_from([SHARD1, SHARD2, "", ".", "..", "/etc/passwd", f"../{SHARD1}", f"sub/../{SHARD1}",
                              f"{SHARD1}\x00", "config.json", INDEX_NAME, "a\\..\\b", "\ud800"]) | st.text(max_size=20)
indexes = st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=30), file_names | json_values,
                                                               max_size=6)},
                                optional={"metadata": json_values}) | json_values


def parses_or_rejects(raw: bytes) -> None:
    try:
        out = parse_index(raw, path="/fuzz/model.safetensors.index.json")
    except CheckpointError as err:
        assert err.file == "/fuzz/model.safetensors.index.json"
        return
    assert isinstance(out, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


@fuzz
@given(raw=st.binary(max_size=400))
@known_input(raw=b"[" * 100_000)
@known_input(raw=b'{"weight_map": {"a": ' + b"9" * 5000 + b"}}")
@known_input(raw=b'{"weight_map": {"a": "\xff"}}')
@known_input(raw=b'\xef\xbb\xbf{"weight_map": {}}')
def test_index_parser_any_bytes(raw):
    parses_or_rejects(raw)


@fuzz
@given(index=indexes, cut=st.none() | st.integers(0, 2000), flip=st.none() | st.tuples(st.integers(0, 2000),
                                                                                     st.integers(0, 255)))
def test_index_parser_any_json(index, cut, flip):
    raw = bytearray(json.dumps(index).encode("utf-8", "surrogatepass"))
    if flip is not None and raw:
        raw[flip[0] % len(raw)] = flip[1]
    parses_or_rejects(bytes(raw[:cut] if cut is not None else raw))


REAL_INDEX = json.loads(json.dumps({"weight_map": {n: SHARD1 if n.startswith(("model.embed", "model.layers.0."))
                                                   else SHARD2 for n in example_tensors()}}))
ROOT_MARK = "/fuzz-root"  # replaced by the directory's parent (an absolute path to a real copy)
SPELLINGS = ("{f}", "./{f}", "../{f}", "sub/../{f}", "/{f}", ROOT_MARK + "/{f}", "sub/./../{f}")


def _respelled(spelled: dict[str, str]) -> dict:
    """The example's own index, each shard named as ``spelled[shard]`` spells it (one spelling per
    file: two spellings of one file are two files holding the same tensors)."""
    return {"weight_map": {n: spelled[f].format(f=f) for n, f in REAL_INDEX["weight_map"].items()}}


real_indexes = st.builds(_respelled, st.fixed_dictionaries({f: st.sampled_from(SPELLINGS) for f in (SHARD1, SHARD2)}))


def escapes(index: object) -> bool:
    """Whether an index has an entry that is an absolute path or, normalized, leaves the directory
    ('sub/../x' is 'x', inside; 'sub/../../x' is not)."""
    wm = index.get("weight_map") if isinstance(index, dict) else None
    return isinstance(wm, dict) and any(
        isinstance(v, str) and (os.path.isabs(v) or os.path.normpath(v.replace("\\", "/")).split("/")[0] == "..")
        for v in wm.values())


@pytest.fixture(scope="module")
def fuzz_dir(example, tmp_path_factory):
    """A checkpoint whose index each example overwrites; copies of its shards lie one level up, so an
    entry that leaves the directory would find a real file there."""
    root = tmp_path_factory.mktemp("fuzz")
    d = copy_checkpoint(example, str(root / "ckpt"))
    os.mkdir(os.path.join(d, "sub"))
    for shard in (SHARD1, SHARD2):
        shutil.copyfile(os.path.join(d, shard), str(root / shard))
    return d


def test_fuzzed_indexes_start_from_the_real_one(example):
    with open(os.path.join(example, INDEX_NAME)) as f:
        assert json.load(f)["weight_map"] == REAL_INDEX["weight_map"]


@fuzz
@given(index=real_indexes | indexes)
@known_input(index=REAL_INDEX)
def test_any_index_opens_or_raises_checkpoint_error(fuzz_dir, index):
    """Through open_checkpoint: entries naming files inside, outside, missing, odd or not files at all."""
    text = json.dumps(index).replace(ROOT_MARK, os.path.dirname(fuzz_dir))
    index = json.loads(text)
    with open(os.path.join(fuzz_dir, INDEX_NAME), "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    try:
        ckpt = open_checkpoint(fuzz_dir)
    except CheckpointError as err:
        assert err.file is not None
        return
    assert not escapes(index), index  # an entry leaving the directory is refused, even where a file is
    assert all(os.path.dirname(os.path.normpath(p)) == fuzz_dir for p in ckpt.files)
    assert set(index["weight_map"]) <= set(ckpt.tensors) <= set(REAL_INDEX["weight_map"])  # as the index says


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz-header") / "m.safetensors")


LENGTH_WORDS = st.integers(0, 2**64 - 1) | st.integers(0, 600) | st.sampled_from(
    [MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**62, 2**63, 2**64 - 1])


@fuzz
@given(blob=st.binary(max_size=600), length=st.none() | LENGTH_WORDS)
def test_read_header_of_any_file_raises_only_checkpoint_error(fuzz_file, blob, length):
    """Random files: raw bytes, or a chosen length word over random bytes."""
    with open(fuzz_file, "wb") as f:
        f.write(blob if length is None else struct.pack("<Q", length) + blob)
    try:
        read_header(fuzz_file)
    except CheckpointError as err:
        assert err.file == fuzz_file


@fuzz
@given(length=st.integers(MAX_HEADER_BYTES + 1, 2**64 - 1) | st.integers(MAX_HEADER_BYTES + 1, 2**40),
       head=st.binary(max_size=64))
def test_header_length_over_the_limit_is_refused_without_reading(fuzz_file, length, head):
    """The file really is that long (sparse), so only the bound stops the read; nothing near
    MAX_HEADER_BYTES is allocated."""
    with open(fuzz_file, "wb") as f:
        f.write(struct.pack("<Q", length) + head)
    os.truncate(fuzz_file, min(8 + length, 2**40))
    err, peak = refusal_and_peak(lambda: read_header(fuzz_file))
    assert f"header length {length} is larger than" in err.message
    assert peak < 2**20, peak
