"""Safetensors headers: tensor names, dtypes, shapes and byte offsets, validated.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the data
area; each tensor's ``data_offsets`` are ``[begin, end)`` relative to the data area.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""headers larger than this are refused before allocating them (safetensors' own bound)"""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # unsigned dtypes beyond uint8 exist in torch >= 2.3
        DTYPES[_name] = getattr(torch, _attr)
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}


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
    """full shape"""
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


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses and validates the header of one safetensors file.

    Raises:
        CheckpointError: the file is short, the header is malformed, or a tensor's
            dtype, shape or offsets are inconsistent; the message names file and tensor.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"safetensors file is shorter than its 8-byte header length "
                                      f"({size} bytes)", file=path)
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"header length {length} is larger than the file ({size} bytes) "
                                      f"or the {MAX_HEADER_BYTES}-byte limit", file=path)
            raw = f.read(length)
    except OSError as err:  # unreadable, a directory, vanished between listing and opening
        raise CheckpointError(f"cannot read safetensors file: {err.strerror or err}", file=path) from None
    if len(raw) != length:
        raise CheckpointError(f"file ended while reading its {length}-byte header", file=path)
    return parse_header(raw, path=path, file_size=size)


def parse_header(raw: bytes, *, path: str, file_size: int) -> dict[str, TensorInfo]:
    """Validates header JSON ``raw`` of a file of ``file_size`` bytes; see ``read_header``."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers over the digit limit
        raise CheckpointError(f"header is not valid JSON: {err}", file=path) from None
    except RecursionError:
        raise CheckpointError("header JSON is nested too deeply", file=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", file=path)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(name, entry, path=path, data_start=data_start, data_len=data_len)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"data_offsets of {n0} and {n1} overlap", file=path, tensor=n1)
    return tensors


def _tensor_info(name: str, entry: object, *, path: str, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError("header entry is not an object", file=path, tensor=name)
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"unknown dtype {entry.get('dtype')!r} (known: {', '.join(DTYPES)})",
                              file=path, tensor=name)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"shape {shape!r} is not a list of non-negative integers", file=path, tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"data_offsets {offsets!r} is not a pair of integers", file=path, tensor=name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"data_offsets {offsets} run backwards", file=path, tensor=name)
    if end > data_len:
        raise CheckpointError(f"data_offsets {offsets} run past the end of the data "
                              f"({data_len} bytes)", file=path, tensor=name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != end - begin:
        raise CheckpointError(f"shape {shape} x {entry['dtype']} is {math.prod(shape) * itemsize} bytes "
                              f"but data_offsets span {end - begin}", file=path, tensor=name)
    return TensorInfo(name=name, file=path, dtype=dtype, shape=tuple(shape),
                      begin=data_start + begin, end=data_start + end)
