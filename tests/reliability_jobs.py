"""Rank jobs for tests/test_bad_checkpoints.py (importable by the pool's workers).

Every job returns a plain dict per rank, never raises a DistloadError, so the test sees
what each rank did: its error's class and named fields, or its report.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import distload
from distload.models import reference_model


def outcome(directory: str | list[str], tp: int, options: dict | None = None, *, digests: bool = False,
            tmpdir: str | None = None, truncate: dict | None = None, fail_rank: int | None = None) -> dict:
    """Loads on this rank and describes what happened.

    Args:
        directory: the checkpoint, or one per rank (indexed by rank).
        options: further LoadConfig fields.
        digests: also return a digest of every parameter of this rank (name -> dtype, shape, sha256).
        tmpdir: run with ``tempfile``'s directory and ``$TMPDIR`` pointed here (to see what the load leaves).
        truncate: ``{"file": name, "size": n}``: after the headers were read (in the model builder),
            cut this rank's copy of that weight file to ``n`` bytes (a file that shrinks mid-load).
        fail_rank: this rank raises a CheckpointError after its first read (a failing rank).

    Returns:
        ``{"ok": True, "report": json, ["digests": ...]}``, or ``{"ok": False, "type", "message", "text",
        "rank", "failed_rank", "file", "tensor", ["report"]}``.
    """
    rank = int(os.environ.get("RANK", "0"))
    if isinstance(directory, list):
        directory = directory[rank]
    config = distload.LoadConfig(tp=tp, device="cpu", **(options or {}))
    build = reference_model
    if truncate is not None:
        def build(ctx, _path=os.path.join(directory, truncate["file"])):
            os.truncate(_path, truncate["size"])
            return reference_model(ctx)
    progress = None
    if fail_rank is not None:
        def progress(done: int, total: int) -> None:
            if rank == fail_rank:
                raise distload.CheckpointError("injected read failure", file="injected.safetensors",
                                               tensor="model.norm.weight")
    saved = (tempfile.tempdir, os.environ.get("TMPDIR"))
    if tmpdir is not None:
        tempfile.tempdir = tmpdir
        os.environ["TMPDIR"] = tmpdir
    try:
        loaded = distload.load(directory, config, build=build, progress=progress)
    except distload.DistloadError as err:
        out = {"ok": False, "type": type(err).__name__, "message": err.message, "text": str(err),
               "rank": err.rank, "failed_rank": getattr(err, "failed_rank", None), "file": err.file,
               "tensor": err.tensor}
        if isinstance(err, distload.MissingWeightsError):
            out["report"] = err.report.to_json()
        return out
    finally:
        if tmpdir is not None:
            tempfile.tempdir = saved[0]
            if saved[1] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved[1]
    out = {"ok": True, "report": loaded.report.to_json()}
    if digests:
        out["digests"] = param_digests(loaded.model)
    return out


def param_digests(model) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Returns name -> (dtype, shape, sha256 of the raw bytes) for every entry of the state dict."""
    import torch

    out = {}
    for name, t in model.state_dict().items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return out


def outcome_with(directory: str | list[str], tp: int, options: dict | None, extra: dict) -> dict:
    """``outcome`` with its keyword arguments in a dict (the pool passes positional arguments only)."""
    return outcome(directory, tp, options, **extra)
