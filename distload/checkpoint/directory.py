"""A Hugging Face checkpoint directory: config, safetensors files and their index."""

from __future__ import annotations

import json
import os
import posixpath
import stat
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from .. import jsondoc
from ..errors import CheckpointError
from .files import kind, read_regular, reason, require_regular
from .header import TensorInfo, read_file_header
from .pickled import read_pickle_header

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
    sizes: Mapping[str, int]
    """each file's size in bytes when its header was read (no later ``stat`` can fail)"""


def open_checkpoint(directory: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Reads ``config.json`` and the headers of every weight file of ``directory``.

    Args:
        directory: the checkpoint directory (symlinked files inside it are followed).
        allow_pickle: with no safetensors files, read ``.bin``/``.pt`` files with
            ``torch.load(weights_only=True)``; refused otherwise.

    Example:
        >>> from distload.examples import example_checkpoint
        >>> ckpt = open_checkpoint(example_checkpoint())
        >>> "model.norm.weight" in ckpt.tensors
        True

    Raises:
        CheckpointError: naming the file (and tensor) that is missing, malformed, not a
            regular file, or unreadable (every OSError on the way becomes one).
    """
    directory = os.path.abspath(directory)
    found = _list_directory(directory)
    config_path = os.path.join(directory, "config.json")
    config = _read_json(config_path, what="config.json")
    fmt, files = _weight_files(directory, allow_pickle, found)
    tensors: dict[str, TensorInfo] = {}
    sizes: dict[str, int] = {}
    for path, expected in files:
        if fmt == "safetensors":
            read = read_file_header(path)
            header, sizes[path] = read.tensors, read.size
        else:
            sizes[path] = require_regular(path, what="pickle weight file").st_size
            header = read_pickle_header(path)
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(f"tensor is stored twice, also in {tensors[name].file}",
                                      file=path, tensor=name)
            tensors[name] = info
        if expected is not None:
            for name in sorted(expected - header.keys()):
                raise CheckpointError(f"the index places this tensor in {os.path.basename(path)}, "
                                      "which does not hold it", file=path, tensor=name)
    return Checkpoint(directory=directory, config=MappingProxyType(config), tensors=MappingProxyType(tensors),
                      files=tuple(p for p, _ in files), sizes=MappingProxyType(sizes))


def weight_files(directory: str, *, allow_pickle: bool = False) -> tuple[str, ...]:
    """The weight files ``open_checkpoint`` would read from ``directory``, found from its listing
    and its index alone (no header is read).

    Raises:
        CheckpointError: as ``open_checkpoint`` for the directory, its index and its weight files.
    """
    directory = os.path.abspath(directory)
    _, files = _weight_files(directory, allow_pickle, _list_directory(directory))
    return tuple(path for path, _ in files)


def _list_directory(directory: str) -> list[str]:
    """The sorted names in ``directory``, which must be a listable, non-empty directory."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise CheckpointError("checkpoint directory does not exist", file=directory) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot open the checkpoint directory: {reason(err)}", file=directory) from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a regular file" if stat.S_ISREG(st.st_mode) else kind(st.st_mode)
        raise CheckpointError(f"checkpoint path is {what}, not a directory", file=directory)
    try:
        found = sorted(os.listdir(directory))
    except OSError as err:  # e.g. mode 0o111: it can be entered but not listed
        raise CheckpointError(f"cannot list the checkpoint directory: {reason(err)}", file=directory) from None
    if not found:
        raise CheckpointError("checkpoint directory is empty", file=directory)
    return found


def _read_json(path: str, *, what: str) -> dict:
    if not os.path.lexists(path):
        raise CheckpointError(f"{what} is missing", file=path)
    # opened as a regular file only (a FIFO swapped in after the listing cannot block it)
    raw = read_regular(path, what=what, limit=MAX_INDEX_BYTES)
    try:
        value = jsondoc.parse(raw)
    except ValueError as err:  # not UTF-8, not JSON, nested too deep, a number of too many digits
        raise CheckpointError(f"{what} is unreadable: {err}", file=path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object", file=path)
    return value


MAX_INDEX_BYTES = 64 * 1024 * 1024
"""index files larger than this are refused before reading them (real ones are a few MB)"""

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAMES = ("pytorch_model.bin", "model.pt", "model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def parse_index(raw: bytes, *, path: str) -> dict[str, str]:
    """Parses an index file's bytes into ``{tensor name: relative file name}``.

    Raises:
        CheckpointError: anything else than a JSON object whose ``weight_map`` maps
            strings to strings; the message names the file.
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # bad UTF-8, bad JSON, integers over the digit limit
        raise CheckpointError(f"index is not valid JSON: {err}", file=path) from None
    except RecursionError:
        raise CheckpointError("index JSON is nested too deeply", file=path) from None
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("index has no weight_map of tensor name -> file name", file=path)
    return weight_map


def _read_index(path: str) -> dict[str, str]:
    return parse_index(read_regular(path, what="index", limit=MAX_INDEX_BYTES), path=path)


def _weight_files(directory: str, allow_pickle: bool,
                  found: list[str]) -> tuple[str, list[tuple[str, set[str] | None]]]:
    """Returns the format and (path, names the index places there or None) for each file.

    Safetensors files win whenever there are any; pickle files (``.bin``/``.pt``) are
    used only when there are no others and ``allow_pickle`` is set. ``found``: the
    directory's names, sorted.
    """
    if any(f.endswith(".safetensors") for f in found) or INDEX_NAME in found:
        return "safetensors", _listed(directory, INDEX_NAME, (SINGLE_NAME,), (".safetensors",), found)
    pickles = [f for f in found if f.endswith(PICKLE_SUFFIXES) or f == PICKLE_INDEX_NAME]
    if not pickles:
        what = "is empty" if not found else "holds no *.safetensors file"
        raise CheckpointError(f"checkpoint directory {what} (no {SINGLE_NAME} or {INDEX_NAME})", file=directory)
    if not allow_pickle:
        raise CheckpointError(f"only pickle weight files ({', '.join(pickles[:3])}) and no safetensors; pickle "
                              "files can run code when loaded: pass --allow-pickle-format to load them "
                              "with torch.load(weights_only=True)", file=directory)
    return "pickle", _listed(directory, PICKLE_INDEX_NAME, PICKLE_SINGLE_NAMES, PICKLE_SUFFIXES, found)


def _listed(directory: str, index_name: str, singles: tuple[str, ...], suffixes: tuple[str, ...],
            found: list[str]) -> list[tuple[str, set[str] | None]]:
    if index_name in found:
        index_path = os.path.join(directory, index_name)
        by_file: dict[str, set[str]] = {}  # normalized first: ./a and x/../a are one file, not two
        for name, rel in _read_index(index_path).items():
            by_file.setdefault(_normalized(rel, index_path, tensor=name), set()).add(name)
        out = []
        for rel in sorted(by_file):
            path = os.path.join(directory, *rel.split("/"))
            if not os.path.lexists(path):  # anything else that is no regular file: read_file_header says so
                raise CheckpointError(f"the index names {rel}, which does not exist", file=path,
                                      tensor=min(by_file[rel]))
            out.append((path, by_file[rel]))
        return out
    for single in singles:
        if single in found:
            return [(os.path.join(directory, single), None)]
    return [(os.path.join(directory, f), None) for f in found if f.endswith(suffixes)]


def _normalized(rel: str, index_path: str, *, tensor: str | None = None) -> str:
    """An index entry as a normalized ``/``-separated path inside the directory.

    ``.`` and ``x/..`` collapse on the text (``posixpath.normpath``), so ``./a`` and
    ``sub/../a`` are ``a``; what is absolute, empty, the directory itself or outside it
    after that is refused. Symlinks inside the directory are followed (the Hugging Face
    cache links snapshot files to blobs elsewhere): the check is on the entry's text.
    """
    if "\0" in rel:
        raise CheckpointError(f"index entry {rel!r} holds a NUL byte: no file has that name", file=index_path,
                              tensor=tensor)
    text = rel.replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    if not text or text.startswith("/") or os.path.isabs(rel) or norm in (".", "..") or norm.startswith("../"):
        raise CheckpointError(f"index entry {rel!r} is an absolute path or leaves the directory",
                              file=index_path, tensor=tensor)
    return norm
