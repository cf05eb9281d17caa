"""Opening checkpoint files: regular files only, never blocking, every OSError a CheckpointError.

A FIFO, socket or device named like a weight file would block ``open()`` or read without
end; each is refused by ``stat`` before opening, and the open itself is non-blocking and
checked again with ``fstat``, so one swapped in between cannot block either.
"""

from __future__ import annotations

import os
import stat

from ..errors import CheckpointError
from .hub_cache import missing_blob

OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
"""read-only; no wait on a FIFO's writer, no descriptor leaked into children, no controlling terminal"""

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind(mode: int) -> str:
    """Names a non-regular file type as a phrase ("a FIFO")."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def reason(err: OSError | ValueError) -> str:
    """An OSError's text without the path (the error names the file), or why a name is unusable."""
    if isinstance(err, ValueError):  # a NUL byte or an unencodable character in the name
        return f"unusable file name ({err})"
    return err.strerror or str(err)


def require_regular(path: str, *, what: str, tensor: str | None = None) -> os.stat_result:
    """Returns ``os.stat(path)`` (symlinks followed) of a regular file.

    Raises:
        CheckpointError: ``cannot read {what}: ...`` when the file is missing, unreachable
            or not a regular file; names the file (and ``tensor``).
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError) as err:
        blob = missing_blob(path) if isinstance(err, FileNotFoundError) else None
        raise CheckpointError(f"cannot read {what}: {reason(err)}" + (f" ({blob})" if blob else ""),
                              file=path, tensor=tensor) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"cannot read {what}: it is {kind(st.st_mode)}, not a regular file",
                              file=path, tensor=tensor)
    return st


def open_regular(path: str, *, what: str, tensor: str | None = None) -> tuple[int, int]:
    """Opens the regular file ``path`` read-only without blocking.

    Returns:
        ``(descriptor, size in bytes)``; the caller closes the descriptor.

    Raises:
        CheckpointError: as ``require_regular``, also when a non-regular file was swapped in
            between the ``stat`` and the open.
    """
    require_regular(path, what=what, tensor=tensor)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {what}: {reason(err)}", file=path, tensor=tensor) from None
    try:
        st = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise CheckpointError(f"cannot read {what}: {reason(err)}", file=path, tensor=tensor) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"cannot read {what}: it is {kind(st.st_mode)}, not a regular file",
                              file=path, tensor=tensor)
    return fd, st.st_size


def pread_exact(fd: int, n: int, offset: int, *, what: str, path: str) -> bytes:
    """Reads ``n`` bytes at ``offset``, looping over short reads; fewer at end of file.

    Raises:
        CheckpointError: the read failed (``I/O error``), naming the file.
    """
    parts, done = [], 0
    while done < n:
        try:
            part = os.pread(fd, min(n - done, 1 << 30), offset + done)
        except OSError as err:
            raise CheckpointError(f"cannot read {what}: {reason(err)}", file=path) from None
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def read_regular(path: str, *, what: str, limit: int) -> bytes:
    """Returns the bytes of the regular file ``path``, refused when over ``limit`` bytes.

    Raises:
        CheckpointError: not a readable regular file, or larger than ``limit``; names the file.
    """
    fd, size = open_regular(path, what=what)
    try:
        if size > limit:
            raise CheckpointError(f"{what} is {size} bytes, over the {limit}-byte limit", file=path)
        return pread_exact(fd, size, 0, what=what, path=path)
    finally:
        os.close(fd)
