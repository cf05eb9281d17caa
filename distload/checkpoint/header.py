"""Safetensors headers: tensor names, dtypes, shapes and byte offsets, held to the format exactly.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the data area; each
tensor's ``data_offsets`` are ``[begin, end)`` relative to the data area. A file is accepted
exactly when ``safetensors.torch.load_file`` accepts it (the Rust reader's rules plus its torch
conversion): the header is at most 100,000,000 bytes of UTF-8 JSON as ``serde_json`` reads it
(no NaN, no lone surrogates, numbers within range, at most 127 levels deep), ``__metadata__``
maps strings to strings, and the tensors, sorted by offset, cover the data area exactly:
no gap, no overlap, no byte before the first or after the last.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .files import open_regular, pread_exact

MAX_HEADER_BYTES = 100_000_000
"""headers larger than this are refused before allocating them (safetensors' own bound)"""
MAX_JSON_DEPTH = 127
"""objects and arrays nested deeper than this are refused (where serde_json's limit meets safetensors);
only an entry's ignored fields can nest so deep and be otherwise valid"""
MAX_DIM = 2**63 - 1
"""torch sizes are int64: a larger dimension cannot be a tensor even with zero elements"""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtypes with one torch element per stored element"""
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("C64", "complex64")):
    if hasattr(torch, _attr):  # newer dtypes exist only in newer torch
        DTYPES[_name] = getattr(torch, _attr)
PACKED: dict[str, torch.dtype] = {"F4": torch.float4_e2m1fn_x2} if hasattr(torch, "float4_e2m1fn_x2") else {}
"""4-bit dtypes: two values per torch element, so a shape's last dimension halves (as safetensors does)"""
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
"""every dtype of the safetensors format and its bits per element"""
BITS_ORDER = (*DTYPES, *PACKED, *(n for n in BITS if n not in DTYPES and n not in PACKED))
"""dtype names in the order messages list them"""
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in (*DTYPES.values(), *PACKED.values())}


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    """checkpoint tensor name"""
    file: str
    """path of the safetensors file"""
    dtype: torch.dtype
    """element type"""
    shape: tuple[int, ...]
    """full shape (in torch elements: a 4-bit tensor's last dimension is halved)"""
    begin: int
    """absolute file offset of the first byte"""
    end: int
    """absolute file offset one past the last byte"""
    pickled: bool = False
    """stored in a pickle file: offsets count from the tensor's own first byte"""

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    """One safetensors file's validated header."""

    file: str
    """path of the file"""
    size: int
    """the file's size in bytes when the header was read"""
    tensors: dict[str, TensorInfo]
    """every tensor of the file, by name"""
    metadata: dict[str, str] | None
    """the free-form ``__metadata__`` map, if present"""


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses and validates the header of one safetensors file.

    Example:
        >>> from distload.examples import example_checkpoint
        >>> tensors = read_header(f"{example_checkpoint()}/model-00002-of-00002.safetensors")
        >>> tensors["model.norm.weight"].shape
        (64,)

    Raises:
        CheckpointError: the file is not a readable regular file, is short, or breaks the
            format; the message says how and names file and tensor.
    """
    return read_file_header(path).tensors


def read_file_header(path: str) -> Header:
    """Reads one safetensors file's header, as ``read_header`` does.

    Returns:
        the tensors with the file's size (``Checkpoint.sizes``) and its ``__metadata__``.

    Raises:
        CheckpointError: as ``read_header``.
    """
    fd, size = open_regular(path, what="safetensors file")
    try:
        head = pread_exact(fd, 8, 0, what="safetensors file", path=path)
        if len(head) < 8:
            raise CheckpointError(f"safetensors file is shorter than its 8-byte header length "
                                  f"({len(head)} bytes)", file=path)
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"header length {length} is larger than the file ({size} bytes)", file=path)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"header length {length} is larger than the safetensors format's limit of "
                                  f"{MAX_HEADER_BYTES} bytes", file=path)
        raw = pread_exact(fd, length, 8, what="safetensors file", path=path)
    finally:
        os.close(fd)
    if len(raw) != length:
        raise CheckpointError(f"file ended while reading its {length}-byte header", file=path)
    tensors, metadata = _parse(raw, path=path, file_size=size)
    return Header(file=path, size=size, tensors=tensors, metadata=metadata)


def parse_header(raw: bytes, *, path: str, file_size: int) -> dict[str, TensorInfo]:
    """Validates header JSON ``raw`` of a file of ``file_size`` bytes; see ``read_header``."""
    return _parse(raw, path=path, file_size=file_size)[0]


def _parse(raw: bytes, *, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    tree = _load_json(raw, path)
    if not isinstance(tree, _Object):
        raise CheckpointError("header is not a JSON object", file=path)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata, fields, seen_metadata = None, {}, False
    for key, value in tree:
        if key == "__metadata__":
            if seen_metadata:
                raise CheckpointError("__metadata__ appears twice in the header", file=path)
            metadata, seen_metadata = _metadata(value, path), True
        else:  # a repeated name: every entry must be well-formed, the last one counts (as in safetensors)
            fields[key] = _entry_fields(key, value, path)
    tensors = {name: _tensor_info(name, *f, path=path, data_start=data_start, data_len=data_len)
               for name, f in fields.items()}
    _check_coverage(tensors, path=path, data_start=data_start, data_len=data_len)
    return tensors, metadata


# ---- JSON as serde_json reads it ---------------------------------------------------------------


class _Object(tuple):
    """A JSON object as its ``(key, value)`` pairs, in order, repeated keys kept."""

    __slots__ = ()


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # Python pairs valid \uXXXX surrogates; serde_json refuses lone ones
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # without one, no string can hold a surrogate


def _json_int(text: str) -> int | float:
    if text == "-0" or len(text) > 20:  # serde_json reads -0 and integers beyond 64 bits as floats
        return _json_float(text)
    value = int(text)
    return value if -2**63 <= value < 2**64 else float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _json_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load_json(raw: bytes, path: str) -> object:
    try:
        tree = json.loads(raw.decode("utf-8"), object_pairs_hook=_Object, parse_int=_json_int,
                          parse_float=_json_float, parse_constant=_json_constant)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the hooks' refusals
        raise CheckpointError(f"header is not valid JSON: {err}", file=path) from None
    except RecursionError:
        raise CheckpointError("header JSON is nested too deeply", file=path) from None
    if _SURROGATE_ESCAPE.search(raw):  # rare: walk every key and string
        stack = [tree]
        while stack:
            value = stack.pop()
            if isinstance(value, str) and _LONE_SURROGATE.search(value):
                raise CheckpointError(f"header is not valid JSON: lone surrogate in string {value[:40]!r}",
                                      file=path)
            if isinstance(value, (list, _Object)):
                stack.extend(value)
            elif isinstance(value, tuple):  # a key and its value
                stack.extend(value)
    return tree


def _too_deep(value: object, levels: int) -> bool:
    """Whether ``value`` nests more than ``levels`` objects and arrays (``levels`` >= 0)."""
    stack = [(value, 0)]
    while stack:  # iterative: a deep tree must not exhaust Python's stack here either
        value, depth = stack.pop()
        if isinstance(value, (list, _Object)):
            if depth >= levels:
                return True
            stack.extend((v[1] if isinstance(value, _Object) else v, depth + 1) for v in value)
    return False


def _plain(value: object) -> object:
    """``value`` with objects as dicts, for messages."""
    if isinstance(value, _Object):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---- fields ------------------------------------------------------------------------------------


def _metadata(value: object, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, _Object):
        raise CheckpointError(f"__metadata__ is {_plain(value)!r}, not a map of strings to strings", file=path)
    for key, item in value:
        if not isinstance(item, str):
            raise CheckpointError(f"__metadata__ value of {key!r} is {_plain(item)!r}, not a string "
                                  "(the format allows strings only)", file=path)
    return dict(value)


_FIELDS = ("dtype", "shape", "data_offsets")


def _entry_fields(name: str, entry: object, path: str) -> tuple[str, list[int], list[int]]:
    """An entry's dtype name, shape and offsets, type-checked: an object, or a list in field order."""
    if isinstance(entry, list) and len(entry) == 3:
        found = dict(zip(_FIELDS, entry))
    elif isinstance(entry, _Object):
        found = {}
        for key, value in entry:  # other keys are ignored, as safetensors does (within its depth limit)
            if key not in _FIELDS and _too_deep(value, MAX_JSON_DEPTH - 2):  # below the top object and the entry
                raise CheckpointError("header JSON is nested too deeply", file=path)
            if key in _FIELDS:
                if key in found:
                    raise CheckpointError(f"header entry has '{key}' twice", file=path, tensor=name)
                found[key] = value
        for key in _FIELDS:
            if key not in found:
                raise CheckpointError(f"header entry has no '{key}'", file=path, tensor=name)
    else:
        raise CheckpointError("header entry is not an object (nor a [dtype, shape, data_offsets] list)",
                              file=path, tensor=name)
    dtype, shape, offsets = (found[k] for k in _FIELDS)
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's map form of a unit variant: {"F32": null}
    if not (isinstance(dtype, str) and dtype in BITS):
        raise CheckpointError(f"unknown dtype {_plain(dtype)!r} (known: {', '.join(BITS_ORDER)})",
                              file=path, tensor=name)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"shape {_plain(shape)!r} is not a list of non-negative integers",
                              file=path, tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"data_offsets {_plain(offsets)!r} is not a pair of integers", file=path, tensor=name)
    if min(offsets) < 0:
        raise CheckpointError(f"data_offsets {offsets} are negative", file=path, tensor=name)
    return dtype, shape, offsets


def _tensor_info(name: str, dtype_name: str, shape: list[int], offsets: list[int], *, path: str,
                 data_start: int, data_len: int) -> TensorInfo:
    dtype = DTYPES.get(dtype_name) or PACKED.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"dtype {dtype_name} has no torch type (safetensors cannot load it into torch "
                              "either)", file=path, tensor=name)
    if any(d > MAX_DIM for d in shape):
        raise CheckpointError(f"shape {shape} has a dimension over 2**63 - 1, torch's limit", file=path, tensor=name)
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"data_offsets {offsets} run backwards", file=path, tensor=name)
    if end > data_len:
        raise CheckpointError(f"data_offsets {offsets} run past the end of the data "
                              f"({data_len} bytes)", file=path, tensor=name)
    count = 1
    for d in shape:  # in 64 bits, in order, as safetensors computes it
        count *= d
        if count >= 2**64:
            raise CheckpointError(f"shape {shape} x {dtype_name} overflows 64 bits", file=path, tensor=name)
    bits = count * BITS[dtype_name]
    if bits >= 2**64:
        raise CheckpointError(f"shape {shape} x {dtype_name} overflows 64 bits", file=path, tensor=name)
    if bits % 8:
        raise CheckpointError(f"shape {shape} x {dtype_name} is {bits} bits, not a whole number of bytes",
                              file=path, tensor=name)
    if bits // 8 != end - begin:
        raise CheckpointError(f"shape {shape} x {dtype_name} is {bits // 8} bytes "
                              f"but data_offsets span {end - begin}", file=path, tensor=name)
    torch_shape = tuple(shape)
    if dtype_name in PACKED:
        if not shape or shape[-1] % 2:
            raise CheckpointError(f"shape {shape} x {dtype_name}: torch packs two values per element, so the "
                                  "last dimension must be even", file=path, tensor=name)
        torch_shape = (*shape[:-1], shape[-1] // 2)
    return TensorInfo(name=name, file=path, dtype=dtype, shape=torch_shape,
                      begin=data_start + begin, end=data_start + end)


def _check_coverage(tensors: dict[str, TensorInfo], *, path: str, data_start: int, data_len: int) -> None:
    """The tensors, sorted by offsets, must tile the data area: no gap, no overlap, nothing after."""
    cursor, last = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end, t.name)):
        begin, end = t.begin - data_start, t.end - data_start
        if begin < cursor:
            raise CheckpointError(f"data_offsets of {last} and {t.name} overlap", file=path, tensor=t.name)
        if begin > cursor:
            where = f"after {last}" if last is not None else "before the first tensor"
            raise CheckpointError(f"data_offsets [{begin}, {end}] leave {begin - cursor} bytes {where} unclaimed "
                                  "(safetensors tensors must cover the data area without gaps)",
                                  file=path, tensor=t.name)
        cursor, last = end, t.name
    if cursor != data_len and last is None:
        raise CheckpointError(f"the header lists no tensors but {data_len} bytes follow it", file=path)
    if cursor != data_len:
        raise CheckpointError(f"{data_len - cursor} trailing bytes after the last tensor: the data area is "
                              f"{data_len} bytes but the tensors end at byte {cursor}", file=path, tensor=last)
