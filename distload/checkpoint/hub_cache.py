"""Hugging Face repo ids resolved through the local Hugging Face cache, never the network.

The cache keeps ``models--<org>--<name>/refs/<revision>`` (a commit hash) and
``snapshots/<commit>/`` (the files, as symlinks into ``blobs/``). distload reads
local files only, so a repo that is not there is an error that says how to get it.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from ..errors import CheckpointError

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub's order)."""
    if environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(environ.get("HF_HUB_CACHE") or environ["HUGGINGFACE_HUB_CACHE"])
    home = environ.get("HF_HOME") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve_checkpoint(argument: str, environ: Mapping[str, str] = os.environ) -> str:
    """Returns ``argument`` when it is a path; for a repo id (``org/name`` or ``org/name@revision``)
    that is no local path, its snapshot directory in the Hugging Face cache.

    Example:
        >>> resolve_checkpoint("/no/such/dir")  # paths pass through; opening them reports what is wrong
        '/no/such/dir'

    Raises:
        CheckpointError: a repo id with no snapshot in the cache (the message says how to download it).
    """
    match = _REPO_ID.match(argument)
    if os.path.exists(argument) or match is None:
        return argument
    repo, revision = match["repo"], match["revision"] or "main"
    cache = hub_cache_dir(environ)
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit = revision if _COMMIT.match(revision) else _read_ref(os.path.join(folder, "refs", revision))
    snapshot = os.path.join(folder, "snapshots", commit) if commit else None
    if snapshot is None or not os.path.isdir(snapshot):
        raise CheckpointError(
            f"{argument} is no local directory, and the Hugging Face cache has no snapshot of it at revision "
            f"{revision}; distload reads local files only (it never downloads): fetch it first with "
            f"`hf download {repo}` (huggingface_hub), or pass its directory", file=cache)
    return snapshot


def missing_blob(path: str) -> str | None:
    """Why ``path``, which does not open, is missing, when it is a cache snapshot's link to a blob
    that is gone (deleted, or never fully downloaded); None for any other path.

    Example:
        >>> missing_blob("/no/such/file") is None
        True
    """
    try:
        target = os.readlink(path)
    except (OSError, ValueError):
        return None
    resolved = os.path.join(os.path.dirname(path), target)
    if os.path.basename(os.path.dirname(os.path.normpath(resolved))) != "blobs" or os.path.exists(resolved):
        return None
    return (f"it links to blob {os.path.basename(target)}, which is missing from the Hugging Face cache: "
            "fetch the repo again (`hf download`)")


def _read_ref(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
