"""Malformed and edge-case safetensors files, and the safetensors library's verdict on each.

The oracle is ``safetensors.torch.load_file`` (the Rust reader's header checks, then its
conversion of every tensor to torch): a file is valid exactly when it returns. ``CASES``
are hand-written files, one or more per rule of the format; ``near_valid_files`` is a
hypothesis strategy of files one small change away from valid, for the property that
distload and the library agree on every file.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import strategies as st
from safetensors.torch import load_file

from distload.errors import CheckpointError


def refusal_and_peak(call: Callable[[], object]) -> tuple[CheckpointError, int]:
    """Runs ``call``, which must raise CheckpointError, under tracemalloc: the error, and the peak
    of memory Python allocated meanwhile (a refusal made after reading the bytes shows there)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return info.value, peak


def blob(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``8-byte length | header | data``; ``header`` is an object (dumped) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str = "F32", shape: tuple = (2,), offsets: tuple = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def library_refusal(path: str) -> str | None:
    """None when ``safetensors.torch.load_file`` loads ``path``; else its error's first line."""
    try:
        load_file(path)
    except Exception as err:  # SafetensorError, and TypeError from torch for a shape it cannot hold
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


@dataclass(frozen=True)
class Case:
    """One file, and what distload must say about it."""

    name: str
    data: bytes
    """the whole file"""
    message: str | None = None
    """distload's exact message (without the file/tensor suffix), pinned for the main kinds"""
    tensor: str | None = None
    """the tensor distload's error names"""


E = entry
V = b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'  # one valid entry, as raw JSON
Z8 = bytes(8)


def _raw(text: bytes, data: bytes = Z8) -> bytes:
    return blob(text, data)


def _deep(levels: int) -> bytes:
    return _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": '
                + b"[" * levels + b"]" * levels + b"}}")


CASES: tuple[Case, ...] = (
    # ---- valid edge cases
    Case("one tensor", blob({"a": E()}, Z8)),
    Case("no tensors, no data", blob({}, b"")),
    Case("metadata only", blob({"__metadata__": {"format": "pt"}}, b"")),
    Case("metadata null", blob({"__metadata__": None, "a": E()}, Z8)),
    Case("metadata empty", blob({"__metadata__": {}, "a": E()}, Z8)),
    Case("metadata after a tensor", blob({"a": E(), "__metadata__": {"k": "v"}}, Z8)),
    Case("header padded with spaces", _raw(json.dumps({"a": E()}).encode() + b"      ")),
    Case("header padded with tabs and newlines", _raw(json.dumps({"a": E()}).encode() + b"\t\r\n ")),
    Case("leading whitespace", _raw(b"  \n" + V.join([b'{"a": ', b"}"]))),
    Case("scalar", blob({"a": E("F64", (), (0, 8))}, Z8)),
    Case("empty tensor at the end", blob({"a": E("F32", (2,), (0, 8)), "e": E("F32", (0, 3), (8, 8))}, Z8)),
    Case("empty tensor at the start", blob({"e": E("BF16", (0,), (0, 0)), "a": E()}, Z8)),
    Case("only empty tensors", blob({"e": E("F32", (0,), (0, 0)), "f": E("I8", (3, 0), (0, 0))}, b"")),
    Case("offsets out of name order", blob({"b": E("F32", (1,), (4, 8)), "a": E("F32", (1,), (0, 4))}, Z8)),
    Case("every one-byte dtype", blob({n: E(n, (1,), (i, i + 1)) for i, n in enumerate(
        ["BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"])}, bytes(8))),
    Case("wide dtypes", blob({"c": E("C64", (1,), (0, 8)), "u": E("U64", (1,), (8, 16)),
                              "i": E("I16", (2,), (16, 20)), "f": E("F16", (2,), (20, 24))}, bytes(24))),
    Case("F4 packed two per byte", blob({"a": E("F4", (3, 2), (0, 3))}, bytes(3))),
    Case("extra fields in an entry", blob({"a": {**E(), "note": [1, {"x": None}], "dtype2": 3}}, Z8)),
    Case("entry as a list", _raw(b'{"a": ["F32", [2], [0, 8]]}')),
    Case("dtype as a map", _raw(b'{"a": {"dtype": {"F32": null}, "shape": [2], "data_offsets": [0, 8]}}')),
    Case("same entry twice", _raw(b'{"a": ' + V + b', "a": ' + V + b"}")),
    Case("metadata key twice", _raw(b'{"__metadata__": {"k": "1", "k": "2"}, "a": ' + V + b"}")),
    Case("escaped names", _raw(b'{"a\\u00e9\\ud83d\\ude00": {"dt\\u0079pe": "F\\u00332", "shape": [2], '
                               b'"data_offsets": [0, 8]}}')),
    Case("empty name", blob({"": E()}, Z8)),
    Case("nested 127 deep", _deep(125)),
    Case("zero-size dims up to 2**63 - 1", blob({"a": E("F32", (0, 2**63 - 1), (0, 0))}, b"")),
    Case("large numbers in extra fields", _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], '
                                               b'"x": [1' + b"0" * 300 + b', -99999999999999999999, 1e-400]}}')),
    # ---- the file around the header
    Case("empty file", b"", "safetensors file is shorter than its 8-byte header length (0 bytes)"),
    Case("short length word", b"\x02\x00\x00", "safetensors file is shorter than its 8-byte header length (3 bytes)"),
    Case("header longer than the file", blob({"a": E()}, Z8, length=500),
         "header length 500 is larger than the file (77 bytes)"),
    Case("huge header length", blob(b"{}", length=2**62),
         f"header length {2**62} is larger than the file (10 bytes)"),
    # ---- JSON as safetensors reads it
    Case("not JSON", _raw(b"{nope"), None),
    Case("empty header", _raw(b"", b""), None),
    Case("not UTF-8", _raw(b'{"\xff": 1}'), None),
    Case("byte order mark", _raw(b"\xef\xbb\xbf" + b'{"a": ' + V + b"}"), None),
    Case("NUL after the JSON", _raw(b'{"a": ' + V + b"}\x00"), None),
    Case("non-ASCII space after the JSON", _raw(b'{"a": ' + V + b"}\xc2\xa0"), None),
    Case("NaN in an extra field", _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}'),
         "header is not valid JSON: NaN is not JSON"),
    Case("Infinity in an extra field",
         _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": -Infinity}}'), None),
    Case("float out of range", _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1e999}}'),
         "header is not valid JSON: number 1e999 is out of range"),
    Case("integer out of range", _raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1'
                                      + b"0" * 400 + b"}}"), None),
    Case("lone surrogate", _raw(b'{"a\\ud800": ' + V + b"}"),
         "header is not valid JSON: lone surrogate in string 'a\\ud800'"),
    Case("lone trailing surrogate in metadata", _raw(b'{"__metadata__": {"k": "\\udc00"}, "a": ' + V + b"}"), None),
    Case("control character", _raw(b'{"a\x01": ' + V + b"}"), None),
    Case("nested 128 deep", _deep(126), "header JSON is nested too deeply"),
    Case("nested 100000 deep", _raw(b"[" * 100_000), "header JSON is nested too deeply"),
    Case("top level is a list", blob([1, 2], Z8), "header is not a JSON object"),
    Case("top level is a string", blob("x", Z8), "header is not a JSON object"),
    # ---- __metadata__
    Case("metadata integer value", blob({"__metadata__": {"format": "pt", "step": 3}, "a": E()}, Z8),
         "__metadata__ value of 'step' is 3, not a string (the format allows strings only)"),
    Case("metadata null value", blob({"__metadata__": {"k": None}, "a": E()}, Z8),
         "__metadata__ value of 'k' is None, not a string (the format allows strings only)"),
    Case("metadata nested value", blob({"__metadata__": {"k": {"x": "y"}}, "a": E()}, Z8), None),
    Case("metadata overwritten non-string", _raw(b'{"__metadata__": {"k": 1, "k": "v"}, "a": ' + V + b"}"), None),
    Case("metadata is a list", blob({"__metadata__": ["a"], "a": E()}, Z8),
         "__metadata__ is ['a'], not a map of strings to strings"),
    Case("metadata is a string", blob({"__metadata__": "pt", "a": E()}, Z8), None),
    Case("metadata twice", _raw(b'{"__metadata__": {}, "a": ' + V + b', "__metadata__": {}}'),
         "__metadata__ appears twice in the header"),
    # ---- entries
    Case("entry is a number", blob({"a": 3}, Z8),
         "header entry is not an object (nor a [dtype, shape, data_offsets] list)", "a"),
    Case("entry list too short", _raw(b'{"a": ["F32", [2]]}'), None, "a"),
    Case("entry list too long", _raw(b'{"a": ["F32", [2], [0, 8], 1]}'), None, "a"),
    Case("field twice", _raw(b'{"a": {"dtype": "F32", "shape": [2], "shape": [2], "data_offsets": [0, 8]}}'),
         "header entry has 'shape' twice", "a"),
    Case("field missing", blob({"a": {"dtype": "F32", "shape": [2]}}, Z8), "header entry has no 'data_offsets'", "a"),
    Case("overwritten entry is malformed", _raw(b'{"a": {"dtype": "F32", "shape": [2]}, "a": ' + V + b"}"),
         None, "a"),
    Case("overwritten entry is inconsistent", _raw(b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, '
                                                   b'"a": ' + V + b"}")),
    Case("repeated name with other offsets", _raw(b'{"a": ' + V + b', "a": {"dtype": "F32", "shape": [2], '
                                                  b'"data_offsets": [8, 16]}}', bytes(16)), None, "a"),
    Case("unknown dtype", blob({"a": E("BF17")}, Z8), None, "a"),
    Case("lower-case dtype", blob({"a": E("f32")}, Z8), None, "a"),
    Case("dtype map with a value", _raw(b'{"a": {"dtype": {"F32": []}, "shape": [2], "data_offsets": [0, 8]}}'),
         None, "a"),
    Case("dtype without torch type", blob({"a": E("F6_E2M3", (4,), (0, 3))}, bytes(3)),
         "dtype F6_E2M3 has no torch type (safetensors cannot load it into torch either)", "a"),
    Case("F4 with an odd last dimension", blob({"a": E("F4", (2, 3), (0, 3))}, bytes(3)),
         "shape [2, 3] x F4: torch packs two values per element, so the last dimension must be even", "a"),
    Case("F4 scalar", blob({"a": E("F4", (), (0, 0))}, b""),
         "shape [] x F4 is 4 bits, not a whole number of bytes", "a"),
    Case("shape with a float", blob({"a": E("F32", (2.0,), (0, 8))}, Z8), None, "a"),
    Case("shape with -0", _raw(b'{"a": {"dtype": "F32", "shape": [-0, 2], "data_offsets": [0, 0]}}', b""),
         None, "a"),
    Case("shape with true", blob({"a": E("F32", (True,), (0, 4))}, bytes(4)), None, "a"),
    Case("shape nested", blob({"a": E("F32", ([2],), (0, 8))}, Z8), None, "a"),
    Case("dimension over 2**64", blob({"a": E("F32", (2**64, 0), (0, 0))}, b""), None, "a"),
    Case("dimension over torch's limit", blob({"a": E("F32", (0, 2**63), (0, 0))}, b""),
         "shape [0, 9223372036854775808] has a dimension over 2**63 - 1, torch's limit", "a"),
    Case("element count overflows", blob({"a": E("F32", (2**32, 2**32, 0), (0, 0))}, b""),
         "shape [4294967296, 4294967296, 0] x F32 overflows 64 bits", "a"),
    Case("bit count overflows", blob({"a": E("F64", (2**62,), (0, 0))}, b""), None, "a"),
    Case("offsets of three", blob({"a": E(offsets=(0, 8, 8))}, Z8),
         "data_offsets [0, 8, 8] is not a pair of integers", "a"),
    Case("negative offset", blob({"a": E(offsets=(-8, 0))}, Z8), "data_offsets [-8, 0] are negative", "a"),
    Case("offsets run backwards", blob({"a": E(offsets=(8, 0))}, Z8), "data_offsets [8, 0] run backwards", "a"),
    Case("offsets past the end", blob({"a": E(offsets=(0, 8))}, bytes(4)),
         "data_offsets [0, 8] run past the end of the data (4 bytes)", "a"),
    Case("size mismatch", blob({"a": E("F32", (3,), (0, 8))}, Z8),
         "shape [3] x F32 is 12 bytes but data_offsets span 8", "a"),
    # ---- coverage of the data area
    Case("gap between tensors", blob({"a": E(), "b": E(offsets=(12, 20))}, bytes(20)),
         "data_offsets [12, 20] leave 4 bytes after a unclaimed (safetensors tensors must cover the data "
         "area without gaps)", "b"),
    Case("bytes before the first tensor", blob({"a": E(offsets=(4, 12))}, bytes(12)),
         "data_offsets [4, 12] leave 4 bytes before the first tensor unclaimed (safetensors tensors must cover "
         "the data area without gaps)", "a"),
    Case("trailing bytes", blob({"a": E()}, bytes(12)),
         "4 trailing bytes after the last tensor: the data area is 12 bytes but the tensors end at byte 8", "a"),
    Case("data but no tensors", blob({}, bytes(4)), "the header lists no tensors but 4 bytes follow it"),
    Case("overlap", blob({"a": E("F32", (4,), (0, 16)), "b": E("F32", (4,), (8, 24))}, bytes(24)),
         "data_offsets of a and b overlap", "b"),
    Case("same offsets twice", blob({"a": E(), "b": E()}, Z8), "data_offsets of a and b overlap", "b"),
    Case("empty tensor inside another", blob({"a": E("F32", (4,), (0, 16)), "z": E("F32", (0,), (4, 4))}, bytes(16)),
         "data_offsets of a and z overlap", "z"),
    Case("empty tensor past the end", blob({"a": E("F32", (4,), (0, 16)), "z": E("F32", (0,), (20, 20))},
                                           bytes(16)), None, "z"),
)


# ---- near-valid files, for the agreement property ----------------------------------------------

_SIZES = {"F32": 4, "BF16": 2, "U8": 1, "I64": 8, "BOOL": 1, "F4": 0.5}


@st.composite
def near_valid_files(draw) -> bytes:
    """A valid file (a few tensors, tiled in a random order), then at most a couple of small changes:
    a gap, an overlap, trailing or missing bytes, a wrong shape, metadata of another type, padding."""
    names = draw(st.lists(st.text("abc._", min_size=0, max_size=3), min_size=0, max_size=4, unique=True))
    header: dict = {}
    cursor = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(_SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if dtype == "F4" and (not shape or shape[-1] % 2):
            shape = [*shape[:-1], 2]
        n = 1
        for d in shape:
            n *= d
        size = int(n * _SIZES[dtype])
        header[name] = entry(dtype, tuple(shape), (cursor, cursor + size))
        cursor += size
    data_len = cursor
    changes = draw(st.lists(st.sampled_from(
        ["gap", "shift", "trailing", "short", "shape", "meta-int", "meta-str", "meta-null", "pad", "swap"]),
        max_size=2))
    pad = b""
    for change in changes:
        targets = [n for n in header if n != "__metadata__"]
        if change in ("gap", "shift", "shape", "swap") and not targets:
            continue
        if change == "gap":  # later tensors move on: a hole opens
            t = draw(st.sampled_from(targets))
            delta = draw(st.integers(1, 3))
            begin = header[t]["data_offsets"][0]
            for e in header.values():
                if isinstance(e, dict) and "data_offsets" in e and e["data_offsets"][0] >= begin:
                    e["data_offsets"] = [e["data_offsets"][0] + delta, e["data_offsets"][1] + delta]
            data_len += delta
        elif change == "shift":  # one tensor moves: overlap or gap
            t = draw(st.sampled_from(targets))
            delta = draw(st.integers(-3, 3))
            b, e = header[t]["data_offsets"]
            header[t]["data_offsets"] = [max(0, b + delta), max(0, e + delta)]
        elif change == "trailing":
            data_len += draw(st.integers(1, 5))
        elif change == "short":
            data_len = max(0, data_len - draw(st.integers(1, 5)))
        elif change == "shape":
            t = draw(st.sampled_from(targets))
            header[t]["shape"] = draw(st.lists(st.integers(0, 4), max_size=3))
        elif change == "meta-int":
            header["__metadata__"] = {"format": "pt", "n": draw(st.integers(0, 9))}
        elif change == "meta-str":
            header["__metadata__"] = {"format": "pt"}
        elif change == "meta-null":
            header["__metadata__"] = None
        elif change == "pad":
            pad = b" " * draw(st.integers(1, 8))
        elif change == "swap":  # two tensors trade offsets: valid only when their sizes agree
            if len(targets) >= 2:
                a, b = draw(st.permutations(targets))[:2]
                header[a]["data_offsets"], header[b]["data_offsets"] = (header[b]["data_offsets"],
                                                                        header[a]["data_offsets"])
    return blob(json.dumps(header).encode() + pad, bytes(data_len))


_NAMES = ["F32", "BF16", "U8", "F4", "F6_E3M2", "C64", "BOOL", "F42"]
_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(_NAMES) | _values, "shape": st.lists(st.integers(-1, 4), max_size=3) | _values,
     "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | _values},
    optional={"x": _values})


@st.composite
def json_headers(draw) -> bytes:
    """Any JSON object (NaN included) of entries, near-entries and other values, over 0-64 data bytes."""
    keys = st.text("ab_", max_size=3) | st.just("__metadata__")
    header = draw(st.dictionaries(keys, _entries | _values | st.dictionaries(st.text(max_size=2), _scalars),
                                  max_size=4))
    return blob(json.dumps(header).encode(), bytes(draw(st.integers(0, 64))))
