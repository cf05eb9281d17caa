"""Digests of whole checkpoint files, as the Hugging Face Hub names its blobs.

Large (LFS) files are named by their sha256; small ones by their git blob SHA-1, the SHA-1 of
``blob <size>\\0`` followed by the content. hashlib releases the GIL while it hashes a large
buffer, so files hashed on threads of their own run beside the load's reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from types import MappingProxyType
from typing import Mapping

from ..errors import CheckpointError
from .files import open_regular, reason

SHA256 = "sha256"
GIT_SHA1 = "git-sha1"
HEX_DIGITS: Mapping[str, int] = MappingProxyType({SHA256: 64, GIT_SHA1: 40})
"""each algorithm's digest length in hex digits (how a blob's name tells which one names it)"""

CHUNK_BYTES = 8 * 1024 * 1024
"""bytes read and hashed per step (one buffer per hashing thread)"""


def file_digest(path: str, algorithm: str, *, stop: threading.Event | None = None) -> tuple[str, int] | None:
    """Hashes the whole regular file ``path``.

    Args:
        path: the file (symlinks followed).
        algorithm: ``SHA256`` or ``GIT_SHA1``.
        stop: when set, hashing ends early and None is returned (the load failed meanwhile).

    Returns:
        ``(hex digest, bytes hashed)``, or None when ``stop`` was set.

    Raises:
        CheckpointError: the file is missing, no regular file, or a read failed; names the file.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     _ = f.write(b"hello\\n"); f.flush()
        ...     file_digest(f.name, GIT_SHA1)[0]   # what `git hash-object` prints
        'ce013625030ba8dba906f756967f9e9ca394464a'
    """
    fd, size = open_regular(path, what="file to verify")
    try:
        h = hashlib.sha256() if algorithm == SHA256 else hashlib.sha1(b"blob %d\0" % size)
        view = memoryview(bytearray(max(1, min(CHUNK_BYTES, size))))
        done = 0
        while True:
            if stop is not None and stop.is_set():
                return None
            try:
                n = os.preadv(fd, [view], done)
            except OSError as err:
                raise CheckpointError(f"cannot read file to verify: {reason(err)}", file=path) from None
            if n == 0:
                return h.hexdigest(), done
            h.update(view[:n])
            done += n
    finally:
        os.close(fd)
