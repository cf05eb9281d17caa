"""A Hugging Face hub cache laid out as huggingface_hub writes it, for tests (no network).

``models--<org>--<name>/blobs/<etag>`` holds each file once; ``snapshots/<commit>/`` links to
the blobs; ``refs/<revision>`` names the commit. Large (LFS) files' etags are their sha256,
small files' their git blob SHA-1, as on the Hub.
"""

from __future__ import annotations

import hashlib
import os

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def etag(path: str) -> str:
    """The Hub's etag of a file: sha256 for LFS files, the git blob SHA-1 otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache: str, repo_id: str, source: str, *, commit: str = "a" * 40,
               revision: str = "main") -> str:
    """Puts the files of directory ``source`` into ``cache`` as ``repo_id`` at ``commit``
    (``refs/<revision>`` pointing at it); returns the snapshot directory."""
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", commit)
    os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(source)):
        src = os.path.join(source, name)
        blob = os.path.join(folder, "blobs", etag(src))
        if not os.path.exists(blob):
            with open(src, "rb") as f, open(blob, "wb") as out:
                out.write(f.read())
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    with open(os.path.join(folder, "refs", revision), "w") as f:
        f.write(commit)
    return snapshot


def blob_of(snapshot_file: str) -> str:
    """The blob a snapshot's file links to."""
    return os.path.realpath(snapshot_file)


def flip_last_byte(path: str) -> None:
    """Flips every bit of the last byte of ``path`` in place: in a safetensors file, a byte of its last
    tensor's data (the header still parses, the load still completes)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
