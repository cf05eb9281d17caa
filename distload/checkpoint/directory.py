"""A Hugging Face checkpoint directory: config, safetensors files and their index."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from ..errors import CheckpointError
from .header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """Everything planning needs, read from headers only (no tensor data)."""

    directory: str
    """the checkpoint directory"""
    config: Mapping
    """parsed config.json"""
    tensors: Mapping[str, TensorInfo]
    """every tensor of every file, by name"""
    files: tuple[str, ...]
    """the safetensors files, in a fixed order"""


def open_checkpoint(directory: str) -> Checkpoint:
    """Reads ``config.json`` and the headers of every safetensors file of ``directory``.

    Example:
        >>> from distload.examples import example_checkpoint
        >>> ckpt = open_checkpoint(example_checkpoint())
        >>> "model.norm.weight" in ckpt.tensors
        True

    Raises:
        CheckpointError: naming the file (and tensor) that is missing or malformed.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError("checkpoint directory does not exist", file=directory)
    config = _read_json(os.path.join(directory, "config.json"), what="config.json")
    files = _safetensors_files(directory)
    tensors: dict[str, TensorInfo] = {}
    for path, expected in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor is stored twice, also in {tensors[name].file}",
                                      file=path, tensor=name)
            tensors[name] = info
        if expected is not None:
            for name in sorted(expected - tensors.keys()):
                raise CheckpointError(f"the index places this tensor in {os.path.basename(path)}, "
                                      "which does not hold it", file=path, tensor=name)
    return Checkpoint(directory=directory, config=MappingProxyType(config),
                      tensors=MappingProxyType(tensors), files=tuple(p for p, _ in files))


def _read_json(path: str, *, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing", file=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} is unreadable: {err}", file=path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object", file=path)
    return value


def _safetensors_files(directory: str) -> list[tuple[str, set[str] | None]]:
    """Returns (path, names the index places there or None) for each file to read."""
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path, what="index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("index has no weight_map of tensor name -> file name", file=index_path)
        by_file: dict[str, set[str]] = {}
        for name, rel in weight_map.items():
            by_file.setdefault(rel, set()).add(name)
        out = []
        for rel in sorted(by_file):
            path = _inside(directory, rel, index_path)
            if not os.path.isfile(path):
                raise CheckpointError(f"the index names {rel}, which does not exist", file=path,
                                      tensor=min(by_file[rel]))
            out.append((path, by_file[rel]))
        return out
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.isfile(single):
        return [(single, None)]
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file", file=directory)
    return [(os.path.join(directory, f), None) for f in found]


def _inside(directory: str, rel: str, index_path: str) -> str:
    """Joins an index entry to the directory, refusing absolute paths and ``..`` components.

    Symlinks inside the directory are followed (the Hugging Face cache links snapshot
    files to blobs elsewhere): the check is on the entry's text, not its target.
    """
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or ".." in parts or not rel:
        raise CheckpointError(f"index entry {rel!r} is an absolute path or leaves the directory",
                              file=index_path)
    return os.path.join(directory, *parts)
