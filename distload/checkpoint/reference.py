"""Where the digests a checkpoint's files must have come from: the Hugging Face cache, or a manifest.

A snapshot of the Hugging Face cache (``models--org--name/snapshots/<commit>/``) links each file
to ``blobs/<etag>``, and the etag of a large (LFS) file is its sha256, of a small one its git
blob SHA-1: the blob's name is the reference. Any other checkpoint needs a manifest beside it,
``distload-manifest.json``, written by ``python -m distload.manifest CKPT`` from a copy the user
trusts. Everything here reads names, links and the manifest; no file is hashed.

Against a manifest, what the load reads, its index and config.json must be listed and there
(else ``unlisted`` or ``absent``: the load fails). The folder's other weight files (``weight_names``:
every index and ``*.safetensors``/``*.bin``/``*.pt``/``*.pth`` at its top) are judged by name only
and named without failing it: ``present-unread`` (listed, there, not hashed), ``unlisted-unread``
and ``absent-unread``. A snapshot has no such list (the cache keeps none of a repo's files, and a
partial download is normal): each file the load reads is checked against its own blob, and files
it does not read are not judged.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from .. import jsondoc
from ..errors import CheckpointError
from .digests import HEX_DIGITS, SHA256
from .directory import INDEX_NAME, MAX_INDEX_BYTES, PICKLE_INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from .files import read_regular, require_regular

MANIFEST_NAME = "distload-manifest.json"
MANIFEST_FORMAT = "distload-manifest"
MANIFEST_VERSION = 1
HUB_CACHE = "huggingface-cache"
"""reference kind: the blob names of a Hugging Face cache snapshot"""
MANIFEST = "manifest"
"""reference kind: the checkpoint's distload-manifest.json"""
ABSENT = "absent"
"""in the manifest, not in the folder"""
UNLISTED = "unlisted"
"""a weight file in the folder, not in the manifest"""
PRESENT_UNREAD = "present-unread"
"""a weight file the load does not read, in the manifest and the folder (not hashed)"""
UNLISTED_UNREAD = "unlisted-unread"
"""a weight file the load does not read, in the folder, not in the manifest"""
ABSENT_UNREAD = "absent-unread"
"""a file the manifest lists and the load would not read, not in the folder"""
UNREAD = (PRESENT_UNREAD, UNLISTED_UNREAD, ABSENT_UNREAD)
"""the statuses of files the load does not read: named, never failing it"""

_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True, kw_only=True, slots=True)
class FileCheck:
    """One file a load hashes whole, and the digest it must have."""

    name: str
    """its path inside the checkpoint, ``/``-separated"""
    path: str
    """the file read (in a cache snapshot, the link to its blob)"""
    algorithm: str
    """``sha256`` or ``git-sha1`` (git's blob SHA-1)"""
    expected: str
    """the reference digest, lowercase hex"""
    size: int
    """its size in bytes when the checks were made"""
    expected_size: int | None = None
    """the size the manifest records; None for a cache blob (its name holds no size)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Unchecked:
    """A file judged by name against the manifest, before anything is hashed."""

    name: str
    """its path inside the checkpoint"""
    status: str
    """``absent`` or ``unlisted`` (fail the load), or one of ``UNREAD`` (files the load does not read)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Checks:
    """What a load verifies: the files to hash, and the files judged by name only."""

    reference: str
    """``huggingface-cache`` or ``manifest``"""
    source: str
    """the cache's blobs folder, or the manifest file"""
    files: tuple[FileCheck, ...]
    """the files to hash, sorted by name"""
    unchecked: tuple[Unchecked, ...] = ()
    """the manifest's disagreements with the folder, and the weight files the load does not read"""

    def shape(self) -> dict:
        """What every rank must agree on (the verdict exchange has one slot per file); digests are left
        out, so a node whose reference differs names its files as differing instead. Files the load
        does not read are left out too: each node judges its own folder, and their merge names the
        ranks that saw each one."""
        return {"reference": self.reference, "files": [(f.name, f.algorithm) for f in self.files],
                "unchecked": [(u.name, u.status) for u in self.unchecked if u.status not in UNREAD]}


def load_checks(ckpt: Checkpoint) -> Checks:
    """The checks of a load of ``ckpt``: config.json, the index and the weight files it reads, each
    with its reference digest.

    Raises:
        CheckpointError: no reference (the message says how to write a manifest), a cache snapshot
            file that is no link to a blob, or a malformed manifest; names the file.
    """
    names = read_names(ckpt.directory, ckpt.files)
    if is_snapshot(ckpt.directory):
        return _cache_checks(ckpt.directory, names)
    manifest = os.path.join(ckpt.directory, MANIFEST_NAME)
    if os.path.lexists(manifest):
        judged = {*names, _index_name(ckpt.files)}  # the load's index, there or not
        return _manifest_checks(ckpt.directory, manifest, judged, weight_names(ckpt.directory, ckpt.files))
    raise CheckpointError(
        f"--verify-checksums has nothing to check against: the checkpoint is no snapshot of the Hugging Face "
        f"cache and holds no {MANIFEST_NAME}; write one from a copy you trust with "
        f"`python -m distload.manifest {ckpt.directory}`", file=ckpt.directory)


def read_names(directory: str, weight_paths: tuple[str, ...]) -> list[str]:
    """config.json, the index of the weight files when there is one, and the weight files, as sorted
    ``/``-separated names inside ``directory``."""
    index = _index_name(weight_paths)
    names = {"config.json", *(os.path.relpath(p, directory).replace(os.sep, "/") for p in weight_paths)}
    if os.path.lexists(os.path.join(directory, index)):
        names.add(index)
    return sorted(names)


def _index_name(weight_paths: tuple[str, ...]) -> str:
    """The name of the index of a load of ``weight_paths`` (the pickle index when they are pickles)."""
    pickled = bool(weight_paths) and all(p.endswith(PICKLE_SUFFIXES) for p in weight_paths)
    return PICKLE_INDEX_NAME if pickled else INDEX_NAME


def weight_names(directory: str, weight_paths: tuple[str, ...]) -> list[str]:
    """The folder's weight files, as a manifest lists them: ``read_names`` and every file at the top
    of ``directory`` that is an index or ends in a weight suffix, read by this load or not."""
    kinds = (".safetensors", *PICKLE_SUFFIXES)
    try:
        found = os.listdir(directory)
    except OSError:  # open_checkpoint listed it a moment ago; what it read is still the floor
        found = []
    extra = {n for n in found if (n.endswith(kinds) or n in (INDEX_NAME, PICKLE_INDEX_NAME))
             and not os.path.isdir(os.path.join(directory, n))}
    return sorted(extra.union(read_names(directory, weight_paths)))


def is_snapshot(directory: str) -> bool:
    """Whether ``directory`` is a snapshot of the Hugging Face cache (``snapshots/<commit>`` beside
    ``blobs/``)."""
    parent = os.path.dirname(os.path.abspath(directory))
    return os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(parent, "..", "blobs"))


def _cache_checks(directory: str, names: list[str]) -> Checks:
    blobs = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(directory)), "..", "blobs"))
    files = []
    for name in names:
        path = os.path.join(directory, *name.split("/"))
        if not os.path.islink(path):
            raise CheckpointError("is a copy in the Hugging Face cache snapshot, not a link to a blob, so the cache "
                                  "holds no digest of it (a cache made without symlinks?); --verify-checksums "
                                  "needs a checkpoint whose files link to blobs/", file=path)
        target = os.path.realpath(path)
        etag = os.path.basename(target)
        algorithm = next((a for a, digits in HEX_DIGITS.items() if len(etag) == digits and _HEX.match(etag)), None)
        if os.path.dirname(target) != blobs or algorithm is None:
            raise CheckpointError(f"links to {target}, which is no blob of the cache named by its sha256 or git "
                                  "SHA-1, so the cache holds no digest of it", file=path)
        size = require_regular(path, what="file to verify").st_size
        files.append(FileCheck(name=name, path=path, algorithm=algorithm, expected=etag, size=size))
    return Checks(reference=HUB_CACHE, source=blobs, files=tuple(files))


def _manifest_checks(directory: str, manifest: str, judged: set[str], present: list[str]) -> Checks:
    """Hashes what the load reads; ``judged`` (what it reads, its index and config.json) must be
    listed and there, and every other weight file is only named (``UNREAD``)."""
    listed = read_manifest(manifest)
    files, unchecked = [], []
    for name, (digest, size) in sorted(listed.items()):
        path = os.path.join(directory, *name.split("/"))
        if not os.path.lexists(path):
            unchecked.append(Unchecked(name=name, status=ABSENT if name in judged else ABSENT_UNREAD))
        elif name in judged:
            files.append(FileCheck(name=name, path=path, algorithm=SHA256, expected=digest,
                                   size=require_regular(path, what="file to verify").st_size, expected_size=size))
        else:  # the *.bin twin beside the safetensors, an optimizer.pt: not read, so not hashed
            unchecked.append(Unchecked(name=name, status=PRESENT_UNREAD))
    unchecked += [Unchecked(name=name, status=UNLISTED if name in judged else UNLISTED_UNREAD)
                  for name in present if name not in listed]
    return Checks(reference=MANIFEST, source=manifest, files=tuple(files),
                  unchecked=tuple(sorted(unchecked, key=lambda u: u.name)))


def read_manifest(path: str) -> dict[str, tuple[str, int]]:
    """Reads a manifest into ``{name: (sha256, size)}``.

    Raises:
        CheckpointError: not a manifest ``python -m distload.manifest`` writes; names the file and why.
    """
    raw = read_regular(path, what="manifest", limit=MAX_INDEX_BYTES)
    try:
        doc = jsondoc.parse(raw, unique_keys=True)
    except ValueError as err:
        raise _bad_manifest(path, str(err)) from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise _bad_manifest(path, f'no "format": "{MANIFEST_FORMAT}"')
    if doc.get("version") != MANIFEST_VERSION:
        raise _bad_manifest(path, f"version {doc.get('version')!r}, this distload reads {MANIFEST_VERSION}")
    entries = doc.get("files")
    if not isinstance(entries, dict) or not entries:
        raise _bad_manifest(path, 'no "files" object naming the files')
    out = {}
    for name, entry in entries.items():
        digest = entry.get(SHA256) if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not _inside(name):
            raise _bad_manifest(path, f"{name!r} is no path inside the checkpoint")
        if not (isinstance(digest, str) and len(digest) == HEX_DIGITS[SHA256] and _HEX.match(digest)) or \
                isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _bad_manifest(path, f"the entry of {name} is not {{\"sha256\": 64 hex digits, \"size\": bytes}}")
        out[name] = (digest, size)
    return out


def _inside(name: str) -> bool:
    """A normalized relative ``/`` path that stays inside the checkpoint."""
    return bool(name) and "\0" not in name and "\\" not in name and posixpath.normpath(name) == name \
        and not name.startswith("/") and name != ".." and not name.startswith("../")


def _bad_manifest(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"manifest is unreadable: {why} (write it again with `python -m distload.manifest`)",
                           file=path)

