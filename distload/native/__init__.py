"""distload's compiled CUDA reader: built on first use with the machine's C compiler, and cached.

The Python pipeline (``staging``) hands each 2 MB slot between reader threads and a copy thread
under the interpreter lock; at 3,500 slots a load, that lock is where the readers wait. The
compiled reader (``staged_reader.c``) runs the same pipeline in threads of its own. It needs no
CUDA headers and links nothing: the CUDA runtime's functions are handed to it from the library
torch loaded. Where no C compiler is found, or the build fails, ``library()`` says why and loads
go through the Python pipeline, as before.

The shared object lands in ``<cache>/native/`` (``examples.cache_dir``), named by a hash of the
source, the compiler and this machine's architecture, so a change to any of them builds anew.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from ..examples import cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "staged_reader.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-pthread")
ABI = 1
"""the version of the job structure, as ``dl_abi()`` in the source returns it"""
BUILD_SECONDS = 120
"""a compiler that has not finished by then is given up on (a loaded node's first rank)"""

_loaded: "ctypes.CDLL | NativeUnavailable | None" = None


class NativeUnavailable(Exception):
    """Why the compiled reader cannot be used here (the loader then reads through Python)."""


def compiler() -> str | None:
    """``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"].split()[0]) and os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def library() -> ctypes.CDLL:
    """The compiled reader, built into the cache first if it is not there (once a process: a
    failure is remembered, not retried at every load).

    Raises:
        NativeUnavailable: no compiler, the build failed, or the result does not load.
    """
    global _loaded
    if _loaded is None:
        try:
            _loaded = _load()
        except NativeUnavailable as err:
            _loaded = err
    if isinstance(_loaded, NativeUnavailable):
        raise NativeUnavailable(str(_loaded))
    return _loaded


def _load() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set CC, or install cc)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + cc.encode() + " ".join(FLAGS).encode() + platform.machine().encode())
    folder = os.path.join(cache_dir(), "native")
    path = os.path.join(folder, f"staged_reader-{key.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        _build(cc, folder, path)
    try:
        lib = ctypes.CDLL(path)  # its calls let go of the interpreter lock
    except OSError as err:
        raise NativeUnavailable(f"cannot load {path}: {err}") from None
    if lib.dl_abi() != ABI:
        raise NativeUnavailable(f"{path} is built from another version of the source")
    return lib


def _build(cc: str, folder: str, path: str) -> None:
    """Compiles the source to ``path``: into a temporary name first, then renamed, so ranks of
    one node that build at once each finish with a whole file."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
        os.close(fd)
    except OSError as err:
        raise NativeUnavailable(f"cannot write to {folder}: {err.strerror or err} "
                                "(set DISTLOAD_CACHE to a writable directory)") from None
    try:
        done = subprocess.run([*cc.split(), *FLAGS, SOURCE, "-o", partial], capture_output=True, text=True,
                              timeout=BUILD_SECONDS, check=False)
        if done.returncode != 0:
            raise NativeUnavailable(f"{cc} failed to build {SOURCE}: {done.stderr.strip()[-400:]}")
        os.replace(partial, path)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NativeUnavailable(f"{cc} could not build {SOURCE}: {err}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def available() -> str | None:
    """None when the compiled reader can be used here, else why not."""
    try:
        library()
    except NativeUnavailable as err:
        return str(err)
    return None
