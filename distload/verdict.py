"""A run's verdict: the report or the failure, printed once and written as JSON on every exit.

Shared by the launchers (``python -m distload``, ``distload.run``, the Ray launcher), so
that each prints the same report and writes the same file with the same exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

from .errors import DistloadError, LayoutError, MissingWeightsError, PeerFailedError
from .options import Invocation

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3

finishing = threading.Event()
"""set once the verdict is being reported: a late signal no longer interrupts (it would tear the output)"""

lost_peer = threading.Event()
"""set when the run failed because a rank (or the store's host) was lost: a watch thread may still sit
in a call to that host, and the interpreter's own shutdown could abort on it, so the CLI ends at once"""


class Verdict:
    """Prints and writes (atomically) this run's outcome, from the rank that reports.

    ``speaks`` says whether this rank prints (and writes a --json without {rank}); None: as
    under torchrun, rank 0 for a report and ``reporter``'s rank for a failure. A launcher that
    gives the verdicts of several ranks at once (Ray's driver) names the one that speaks.
    """

    def __init__(self, inv: Invocation, *, speaks: bool | None = None) -> None:
        self.inv = inv
        self.mode = "dry-run" if inv.dry_run_world is not None else "load"
        self.speaks = speaks

    def started(self) -> None:
        """Replaces an earlier run's --json at once: a run killed outright must not leave it standing."""
        if self.inv.rank == 0 or self._per_rank:
            self._write({**self._failure_fields(None), "error": {
                "type": "NotFinished", "message": "the run started and has not written its verdict "
                                                  "(still running, or ended without one: killed?)"}})

    def report(self, report, code: int) -> int:
        finishing.set()
        if self._speaker(0):
            print(report.format_text(), flush=True)
        if self._speaker(0) or self._per_rank:
            return self._write(report.to_json(), code)
        return code

    def raised(self, err: DistloadError) -> int:
        """The verdict of a load that raised ``err``: the report for missing weights (exit 3), else
        the error (exit 2 for a layout that does not fit the model, 1 for any other)."""
        if isinstance(err, MissingWeightsError):
            return self.report(err.report, EXIT_INCOMPLETE)
        return self.failed(EXIT_USAGE if isinstance(err, LayoutError) else EXIT_ERROR, err)

    def failed(self, code: int, err: DistloadError) -> int:
        finishing.set()
        if self.mode == "load":  # a dry run has no ranks of its own to name
            err = err.with_rank(self.inv.rank)
        if getattr(err, "lost_ranks", ()):
            lost_peer.set()
        speaker = self._speaker(reporter(err, self.inv.world_size))
        if speaker:
            print(f"distload: error: {err}", file=sys.stderr, flush=True)
        if speaker or self._per_rank:
            return self._write({**self._failure_fields(code), "error": error_json(err)}, code)
        return code

    def _speaker(self, rank: int) -> bool:
        """Whether this rank prints, where ``rank`` is the one that would under torchrun."""
        return self.inv.rank == rank if self.speaks is None else self.speaks

    @property
    def _per_rank(self) -> bool:
        return self.inv.json_per_rank

    def _failure_fields(self, code: int | None) -> dict:
        return failure_json(self.mode, self.inv.checkpoint, code, self.inv.rank)

    def _write(self, payload: dict, code: int = EXIT_OK) -> int:
        if self.inv.json_path is None or write_json(self.inv.json_path, payload, rank=self.inv.rank):
            return code
        return code or EXIT_ERROR


def write_json(path: str, payload: dict, *, rank: int) -> bool:
    """Writes ``payload`` to ``path`` atomically (a rename replaces the file whole, so a reader
    never sees half a verdict); False, after one line, when it cannot."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
        return True
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"distload: error: could not write --json {path}: {err.strerror or err} [rank {rank}]",
              file=sys.stderr, flush=True)
        return False


def reporter(err: DistloadError, world_size: int) -> int:
    """The rank that reports a failure: the lowest one not lost (rank 0 unless it is gone)."""
    lost = set(getattr(err, "lost_ranks", ()) or ()) if isinstance(err, PeerFailedError) else set()
    return next((r for r in range(world_size) if r not in lost), 0)


def failure_json(mode: str | None, checkpoint: str | None, code: int | None, rank: int) -> dict:
    """The verdict of a run that ended without a report (its ``error`` is added by the caller)."""
    from .report import SCHEMA_VERSION, __version__
    return {"schema_version": SCHEMA_VERSION, "distload_version": __version__, "complete": False, "ok": False,
            "mode": mode, "checkpoint": checkpoint, "exit_code": code, "rank": rank}


def error_json(err: DistloadError) -> dict:
    return {"type": type(err).__name__, "message": err.message, "file": err.file, "tensor": err.tensor,
            "rank": err.rank, "failed_rank": getattr(err, "failed_rank", None),
            "lost_ranks": list(getattr(err, "lost_ranks", ()) or ())}


