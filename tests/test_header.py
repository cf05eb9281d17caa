"""Safetensors headers and checkpoint directories: valid files parse exactly, malformed ones
raise CheckpointError naming the file (and tensor)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from distload.checkpoint.directory import open_checkpoint
from distload.checkpoint.header import DTYPES, MAX_HEADER_BYTES, TensorInfo, parse_header, read_header
from distload.errors import CheckpointError, DistloadError


def write_raw(path, header, data: bytes = b"", *, length: int | None = None) -> str:
    """Writes ``8-byte length | header | data``; ``header`` is an object (dumped) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def raises(path, *, tensor: str | None = None, match: str = "") -> CheckpointError:
    """Reads ``path`` expecting a CheckpointError that names it (and ``tensor``)."""
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    err = info.value
    assert err.file == path and path in str(err)
    if tensor is not None:
        assert err.tensor == tensor and f"tensor {tensor}" in str(err)
    assert match in err.message, err.message
    return err


# ---- valid files -------------------------------------------------------------------------------


def test_file_written_by_safetensors_parses_to_exact_offsets(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "d.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.u8": torch.arange(5, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.fp8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "h.scalar": torch.tensor(3.5),
        "i.empty": torch.zeros(0, 4),
        "j.i8": torch.arange(-3, 3, dtype=torch.int8),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    infos = read_header(path)
    assert set(infos) == set(tensors)
    data = open(path, "rb").read()
    for name, t in tensors.items():
        info = infos[name]
        assert info == TensorInfo(name=name, file=path, dtype=t.dtype, shape=tuple(t.shape),
                                  begin=info.begin, end=info.end)
        assert info.nbytes == t.numel() * t.element_size()
        assert info.itemsize == t.element_size()
        assert data[info.begin:info.end] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert min(i.begin for i in infos.values()) == 8 + length  # offsets are absolute


def test_hand_written_header_offsets_are_relative_to_the_data_area(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "x": entry("F32", (2,), (0, 8)), "y": entry("I16", (3,), (8, 14))}
    raw = json.dumps(header).encode()
    path = write_raw(tmp_path / "m.safetensors", raw, bytes(14))
    infos = read_header(path)
    assert (infos["x"].begin, infos["x"].end) == (8 + len(raw), 16 + len(raw))
    assert (infos["y"].begin, infos["y"].end, infos["y"].dtype) == (16 + len(raw), 22 + len(raw), torch.int16)


def test_every_known_dtype_parses(tmp_path):
    header, cursor = {}, 0
    for name, dtype in DTYPES.items():
        size = torch.empty((), dtype=dtype).element_size() * 3
        header[name] = entry(name, (3,), (cursor, cursor + size))
        cursor += size
    infos = read_header(write_raw(tmp_path / "m.safetensors", header, bytes(cursor)))
    assert {n: i.dtype for n, i in infos.items()} == dict(DTYPES)


def test_zero_size_tensors_may_share_an_offset(tmp_path):
    header = {"a": entry("F32", (0,), (4, 4)), "b": entry("F32", (1,), (0, 4)), "c": entry("F32", (0, 3), (4, 4))}
    assert set(read_header(write_raw(tmp_path / "m.safetensors", header, bytes(4)))) == {"a", "b", "c"}


# ---- malformed files ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_the_header_length(tmp_path, size):
    path = str(tmp_path / "short.safetensors")
    open(path, "wb").write(b"\x01" * size)
    raises(path, match=f"shorter than its 8-byte header length ({size} bytes)")


def test_header_length_larger_than_the_file(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": entry()}, bytes(8), length=10_000)
    raises(path, match="header length 10000 is larger than the file")


def test_header_length_over_the_limit_is_refused_before_reading(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", b"{}", length=MAX_HEADER_BYTES + 1)
    raises(path, match=f"header length {MAX_HEADER_BYTES + 1}")


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1', b"\xff\xfe{}", b"", b"[" * 100_000,
                                 b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}"],
                         ids=["garbage", "unterminated", "not-utf8", "empty", "deep", "huge-int"])
def test_header_that_is_not_json(tmp_path, raw):
    path = write_raw(tmp_path / "m.safetensors", raw)
    err = raises(path)
    assert err.message.startswith("header is not valid JSON") or err.message == "header JSON is nested too deeply"


@pytest.mark.parametrize("header", [[1, 2], "x", 3, None])
def test_header_that_is_not_an_object(tmp_path, header):
    raises(write_raw(tmp_path / "m.safetensors", header), match="header is not a JSON object")


def test_overlapping_offsets_name_both_tensors(tmp_path):
    header = {"first": entry("F32", (4,), (0, 16)), "second": entry("F32", (4,), (8, 24))}
    err = raises(write_raw(tmp_path / "m.safetensors", header, bytes(24)), tensor="second")
    assert "data_offsets of first and second overlap" in err.message


def test_identical_offsets_overlap(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))}
    raises(write_raw(tmp_path / "m.safetensors", header, bytes(8)), match="overlap")


@pytest.mark.parametrize("offsets, match", [((8, 0), "run backwards"), ((-8, 0), "data_offsets [-8, 0] are negative"),
                                            ((0, 24), "run past the end of the data (16 bytes)"),
                                            ((16, 24), "run past the end")])
def test_bad_offsets(tmp_path, offsets, match):
    header = {"w": entry("F32", (2,), offsets)}
    raises(write_raw(tmp_path / "m.safetensors", header, bytes(16)), tensor="w", match=match)


@pytest.mark.parametrize("dtype", ["F42", "f32", "", None, 3, ["F32"], {"F32": 1}])
def test_unknown_dtype(tmp_path, dtype):
    header = {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}
    err = raises(write_raw(tmp_path / "m.safetensors", header, bytes(8)), tensor="w", match="unknown dtype")
    assert "known: F64, F32" in err.message


@pytest.mark.parametrize("shape, dtype, offsets", [((2, 2), "F32", (0, 12)), ((3,), "BF16", (0, 8)),
                                                   ((), "F64", (0, 4)), ((0,), "F32", (0, 4))])
def test_shape_times_dtype_must_equal_the_byte_length(tmp_path, shape, dtype, offsets):
    header = {"w": entry(dtype, shape, offsets)}
    raises(write_raw(tmp_path / "m.safetensors", header, bytes(16)), tensor="w",
           match=f"but data_offsets span {offsets[1] - offsets[0]}")


@pytest.mark.parametrize("field, value, match", [
    ("shape", [-1], "is not a list of non-negative integers"),
    ("shape", [2.0], "is not a list of non-negative integers"),
    ("shape", [True], "is not a list of non-negative integers"),
    ("shape", "2", "is not a list of non-negative integers"),
    ("data_offsets", [0], "is not a pair of integers"),
    ("data_offsets", [0, 8.0], "is not a pair of integers"),
    ("data_offsets", None, "is not a pair of integers"),
])
def test_malformed_fields(tmp_path, field, value, match):
    e = entry("F32", (2,), (0, 8))
    e[field] = value
    raises(write_raw(tmp_path / "m.safetensors", {"w": e}, bytes(8)), tensor="w", match=match)


def test_entry_that_is_not_an_object(tmp_path):
    raises(write_raw(tmp_path / "m.safetensors", {"w": [1, 2]}), tensor="w", match="not an object")


def test_path_that_is_not_a_readable_file(tmp_path):
    os.mkdir(tmp_path / "dir.safetensors")
    raises(str(tmp_path / "dir.safetensors"), match="cannot read safetensors file")


def test_error_survives_pickling_with_its_fields(tmp_path):
    import pickle
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("F99")}, bytes(8))
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), again.file, again.tensor, str(again)) == (CheckpointError, path, "w", str(info.value))


# ---- property: any input parses or raises CheckpointError --------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*DTYPES, "F42"]) | json_values,
     "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-4, 200), min_size=2, max_size=2) | json_values})
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5)


def parses_or_raises_checkpoint_error(raw: bytes, file_size: int) -> None:
    try:
        out = parse_header(raw, path="/fuzz.safetensors", file_size=file_size)
    except CheckpointError as err:
        assert err.file == "/fuzz.safetensors"
        return
    data_start = 8 + len(raw)
    spans = []
    for name, info in out.items():  # whatever parsed is self-consistent
        assert data_start <= info.begin <= info.end <= file_size
        assert info.nbytes == info.itemsize * int(torch.Size(info.shape).numel())
        spans.append((info.begin, info.end))
    nonempty = sorted(s for s in spans if s[0] < s[1])
    assert all(a[1] <= b[0] for a, b in zip(nonempty, nonempty[1:]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), file_size=st.integers(0, 2**20))
def test_any_bytes_parse_or_raise_checkpoint_error(raw, file_size):
    parses_or_raises_checkpoint_error(raw, max(file_size, 8 + len(raw)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers | json_values, data_len=st.integers(0, 256))
def test_any_json_header_parses_or_raises_checkpoint_error(header, data_len):
    raw = json.dumps(header).encode()
    parses_or_raises_checkpoint_error(raw, 8 + len(raw) + data_len)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data_len=st.integers(0, 256), cut=st.integers(0, 400))
def test_any_file_reads_or_raises_checkpoint_error(tmp_path_factory, header, data_len, cut):
    """Through read_header: a header (possibly truncated, wrong length word) over arbitrary data."""
    raw = json.dumps(header).encode()
    blob = (struct.pack("<Q", len(raw)) + raw + bytes(data_len))[:cut]
    path = str(tmp_path_factory.mktemp("fuzz") / "m.safetensors")
    open(path, "wb").write(blob)
    try:
        read_header(path)
    except CheckpointError as err:
        assert err.file == path


# ---- checkpoint directories --------------------------------------------------------------------


def make_dir(tmp_path, files: dict[str, dict[str, torch.Tensor]], *, index: dict | None = None,
             config: object = {"model_type": "llama"}) -> str:
    d = tmp_path / "ckpt"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for fname, tensors in files.items():
        save_file(tensors, str(d / fname))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d)


T = {"a": torch.zeros(2), "b": torch.ones(3)}
U = {"c": torch.zeros(4)}


def dir_raises(directory, *, file: str, tensor: str | None = None, match: str = "") -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(directory)
    err = info.value
    assert err.file == file and file in str(err), str(err)
    if tensor is not None:
        assert err.tensor == tensor
    assert match in err.message, err.message
    return err


def test_single_file_directory(tmp_path):
    d = make_dir(tmp_path, {"model.safetensors": T})
    ckpt = open_checkpoint(d)
    assert set(ckpt.tensors) == {"a", "b"} and ckpt.files == (os.path.join(d, "model.safetensors"),)
    assert ckpt.config["model_type"] == "llama" and ckpt.directory == d


def test_indexed_directory(tmp_path):
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "sub/m-2.safetensors"}}
    d = make_dir(tmp_path, {"m-1.safetensors": T}, index=index)
    os.mkdir(os.path.join(d, "sub"))
    save_file(U, os.path.join(d, "sub", "m-2.safetensors"))
    ckpt = open_checkpoint(d)
    assert set(ckpt.tensors) == {"a", "b", "c"}
    assert ckpt.tensors["c"].file == os.path.join(d, "sub", "m-2.safetensors")


def test_unindexed_files_are_all_read(tmp_path):
    d = make_dir(tmp_path, {"x-2.safetensors": U, "x-1.safetensors": T})
    ckpt = open_checkpoint(d)
    assert [os.path.basename(f) for f in ckpt.files] == ["x-1.safetensors", "x-2.safetensors"]
    assert set(ckpt.tensors) == {"a", "b", "c"}


def test_missing_directory(tmp_path):
    dir_raises(str(tmp_path / "nope"), file=str(tmp_path / "nope"), match="does not exist")


def test_no_config_json(tmp_path):
    d = make_dir(tmp_path, {"model.safetensors": T}, config=None)
    dir_raises(d, file=os.path.join(d, "config.json"), match="config.json is missing")


@pytest.mark.parametrize("config, match", [("{oops", "config.json is unreadable"), ("[1]", "not a JSON object")])
def test_bad_config_json(tmp_path, config, match):
    d = make_dir(tmp_path, {"model.safetensors": T}, config=config)
    dir_raises(d, file=os.path.join(d, "config.json"), match=match)


def test_no_safetensors(tmp_path):
    d = make_dir(tmp_path, {})
    open(os.path.join(d, "README.md"), "w").write("weights elsewhere")
    dir_raises(d, file=d, match="holds no *.safetensors file")


def test_only_pickle_files_are_refused_unless_allowed(tmp_path):
    d = make_dir(tmp_path, {})
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"x")
    err = dir_raises(d, file=d, match="only pickle weight files (pytorch_model.bin)")
    assert "--allow-pickle-format" in err.message


def test_index_naming_a_missing_file(tmp_path):
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}
    d = make_dir(tmp_path, {"m-1.safetensors": T}, index=index)
    dir_raises(d, file=os.path.join(d, "m-2.safetensors"), tensor="c", match="the index names m-2.safetensors")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", "",
                                 "..\\x.safetensors"])
def test_index_entry_outside_the_directory(tmp_path, rel):
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": rel}}
    d = make_dir(tmp_path, {"m-1.safetensors": T}, index=index)
    save_file(U, str(tmp_path / "outside.safetensors"))
    dir_raises(d, file=os.path.join(d, "model.safetensors.index.json"),
               match="is an absolute path or leaves the directory")


@pytest.mark.parametrize("index", [{}, {"weight_map": []}, {"weight_map": {"a": 3}}])
def test_index_without_a_weight_map(tmp_path, index):
    d = make_dir(tmp_path, {"m-1.safetensors": T}, index=index)
    dir_raises(d, file=os.path.join(d, "model.safetensors.index.json"), match="no weight_map")


def test_same_tensor_in_two_files(tmp_path):
    d = make_dir(tmp_path, {"x-1.safetensors": T, "x-2.safetensors": {"b": torch.ones(3), **U}})
    err = dir_raises(d, file=os.path.join(d, "x-2.safetensors"), tensor="b", match="tensor is stored twice")
    assert os.path.join(d, "x-1.safetensors") in err.message


def test_index_places_a_tensor_in_a_file_lacking_it(tmp_path):
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}}
    d = make_dir(tmp_path, {"m-1.safetensors": T}, index=index)
    dir_raises(d, file=os.path.join(d, "m-1.safetensors"), tensor="c",
               match="the index places this tensor in m-1.safetensors, which does not hold it")


def test_malformed_file_in_a_directory_names_that_file(tmp_path):
    d = make_dir(tmp_path, {"x-1.safetensors": T})
    write_raw(os.path.join(d, "x-2.safetensors"), {"w": entry("F32", (2,), (0, 12))}, bytes(12))
    dir_raises(d, file=os.path.join(d, "x-2.safetensors"), tensor="w")


def test_checkpoint_errors_are_distload_errors():
    assert issubclass(CheckpointError, DistloadError)
