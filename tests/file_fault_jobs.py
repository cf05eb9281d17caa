"""Rank jobs for tests/test_file_faults.py (importable by the pool's workers).

A job loads this rank's copy of a checkpoint and, once the headers were read (in the model
builder), damages a file of it on the ranks named; it returns what happened as a plain dict.
"""

from __future__ import annotations

import os

import distload
from distload.models import reference_model


def damage(path: str, how: str) -> None:
    """``delete`` the file, or replace it by a ``fifo`` (a read of it would block forever)."""
    os.remove(path)
    if how == "fifo":
        os.mkfifo(path)


def load_damaged(directories: list[str], tp: int, file: str, how: str, ranks: list[int]) -> dict:
    """Loads ``directories[rank]``, damaging ``file`` in it after planning when this rank is in ``ranks``.

    Returns:
        ``{"ok": True}`` or ``{"ok": False, "type", "message", "text", "rank", "failed_rank", "file", "tensor"}``.
    """
    rank = int(os.environ.get("RANK", "0"))
    directory = directories[rank]

    def build(ctx):
        if rank in ranks:
            damage(os.path.join(directory, file), how)
        return reference_model(ctx)

    try:
        distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"), build=build)
    except distload.DistloadError as err:
        return {"ok": False, "type": type(err).__name__, "message": err.message, "text": str(err), "rank": err.rank,
                "failed_rank": getattr(err, "failed_rank", None), "file": err.file, "tensor": err.tensor}
    return {"ok": True}
