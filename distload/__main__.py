"""Command line: ``python -m distload [CHECKPOINT] ...`` (also under torchrun).

Exit codes of each process: 0 complete; 3 missing, inconsistent or mismatched
units (or unexpected ones under --strict, or a file that fails --verify-checksums),
with the report still printed and written; 1 any other DistloadError, as one line; 2 a usage error; 130 / 143
interrupted by SIGINT / SIGTERM. One rank reports (prints and writes --json):
rank 0, or the lowest rank still running when rank 0 is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from .errors import ConfigError, DistloadError
from .options import Invocation, parse
from .verdict import (EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, Verdict, error_json, failure_json,
                      finishing, lost_peer, write_json)



class Interrupted(BaseException):
    """A signal asked this rank to stop: SIGINT (Ctrl-C) or SIGTERM (a launcher, a scheduler)."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"{self.signal_name} received")


def main(argv: list[str] | None = None) -> int:
    _tolerant_output()
    with _signals_raise() as verdicts:
        try:
            inv = parse(argv)
        except ConfigError as err:
            return _usage_error(err)
        except Interrupted as err:
            return err.exit_code
        out = verdicts.out = Verdict(inv)
        try:
            out.started()
            return _run(inv, out)
        except Interrupted as err:
            return _interrupted(out, err)


def _interrupted(out: Verdict, err: Interrupted) -> int:
    return out.failed(err.exit_code, DistloadError(f"interrupted: {err}", rank=out.inv.rank))


def _usage_error(err: ConfigError) -> int:
    """Options that cannot run: one line from rank 0 (ranks are not known yet), and the
    --json verdict when its path was usable."""
    if _env_rank() == 0:
        print(f"distload: error: {err}", file=sys.stderr, flush=True)
        path = getattr(err, "json_path", None)
        if path:
            write_json(path, {**failure_json(None, None, EXIT_USAGE, 0), "error": error_json(err)}, rank=0)
    return EXIT_USAGE


def _run(inv: Invocation, out: Verdict) -> int:
    from . import api
    from .checkpoint.hub_cache import resolve_checkpoint
    from .comm import WorldInfo
    from .examples import example_checkpoint
    from .progress import Progress

    try:
        directory = resolve_checkpoint(inv.checkpoint) if inv.checkpoint else example_checkpoint()
        if inv.dry_run_world is not None:
            from .dryrun import dry_run
            report = dry_run(directory, inv.config, world_size=inv.dry_run_world)
            return out.report(report, EXIT_OK if report.ok else EXIT_INCOMPLETE)
        world = WorldInfo(rank=inv.rank, world_size=inv.world_size,
                          local_rank=int(os.environ.get("LOCAL_RANK", inv.rank)),
                          local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", inv.world_size)))
        progress = Progress() if inv.rank == 0 and not inv.quiet else None
        loaded = api.load(directory, inv.config, world=world, progress=progress)
    except DistloadError as err:  # missing weights: exit 3; a layout that does not fit the model: 2; else 1
        return out.raised(err)
    return out.report(loaded.report, EXIT_OK)


STUCK_SECONDS = 3.0
"""how long a signal may wait for the main thread before the rank gives its verdict without it"""


class _Verdicts:
    """Where the signal watcher finds this rank's verdict, once there is one."""

    out: Verdict | None = None


@contextlib.contextmanager
def _signals_raise():
    """Turns SIGINT and SIGTERM into ``Interrupted`` in the main thread (the load then stops every
    rank through the failure channel), and restores the previous handlers afterwards.

    Python runs a signal's handler in the main thread only between bytecodes, so a main thread
    blocked inside torch (``init_process_group`` waiting for a rank that already left) would never
    see it, and a launcher would kill the rank seconds later with no verdict. A watcher thread reads
    each signal from the wakeup fd; when the main thread has not started its verdict within
    ``STUCK_SECONDS``, the watcher gives it (the same line and JSON) and ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _Verdicts()
        return

    def stop(signum, frame):
        if not finishing.is_set():
            raise Interrupted(signum)

    finishing.clear()
    verdicts = _Verdicts()
    readable, writable = os.pipe()
    os.set_blocking(writable, False)  # the C handler must never block on it
    done = threading.Event()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(writable, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(readable, verdicts, done), name="distload-signals", daemon=True)
    watcher.start()
    try:
        yield verdicts
    finally:
        done.set()
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        # wakes the watcher, which sees done and closes its end; it may have ended already (woken by
        # the signal itself, after done was set): then there is no reader, and nothing to wake
        with contextlib.suppress(BrokenPipeError, BlockingIOError):
            os.write(writable, b"\0")
        os.close(writable)


def _watch(readable: int, verdicts: _Verdicts, done: threading.Event) -> None:
    """The signal watcher (see ``_signals_raise``)."""
    try:
        while not done.is_set():
            signums = [n for n in os.read(readable, 64) if n in (signal.SIGINT, signal.SIGTERM)]
            if not signums or done.is_set() or finishing.wait(STUCK_SECONDS) or done.is_set():
                continue  # handled in the main thread, or over (a run that ended without a verdict)
            out = verdicts.out
            code = _interrupted(out, Interrupted(signums[0])) if out is not None else 128 + signums[0]
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    finally:
        os.close(readable)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _tolerant_output() -> None:
    """Paths need not be UTF-8: print what a strict-UTF-8 terminal cannot show as escapes."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    code = main()
    if lost_peer.is_set():  # the verdict is out; nothing is left to clean up that could not hang
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
