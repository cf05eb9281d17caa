"""``python launch/ray_launch.py [CHECKPOINT] --tp 4 --ep 2 [--address auto] [distload options]``.

Loads a checkpoint onto Ray actors, one per rank (``distload.ray.load``), and ends like the
torchrun CLI: the same report on stdout, the same ``--json`` file and the same exit code
(0 complete, 3 incomplete, 1 a failure, 2 a usage error, 130 / 143 interrupted). The
driver speaks for rank 0 (for the lowest rank still running when rank 0's actor is lost);
a ``--json`` path with ``{rank}`` gets every rank's own file, as each torchrun rank writes it
(a rank whose actor died leaves its "NotFinished" placeholder, as a killed process does).
distload's options mean what they mean for ``python -m distload``; the world is
``--num-ranks``, default tp x pp x (dp or 1). The checkpoint must be at the same path on
every node that hosts a rank.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import signal
import sys
import threading

from distload.errors import ConfigError, DistloadError
from distload.layout import check_ranks
from distload.options import Invocation, parse
from distload.verdict import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, Verdict, error_json, failure_json, \
    reporter, write_json
from distload.ray import READY_TIMEOUT, STRATEGIES


RANKS_START = "launch/ray_launch.py ... --num-ranks {need}"
"""how this launcher starts more ranks, in the message of a world too small for the layout"""

_sigterm = threading.Event()
"""set when SIGTERM (a scheduler, a CI timeout) asked the driver to stop"""


def launcher_parser() -> argparse.ArgumentParser:
    """This launcher's own options; everything else is distload's."""
    p = argparse.ArgumentParser(prog="launch/ray_launch.py", allow_abbrev=False, add_help=False,
                                description="Load a checkpoint onto Ray actors, one per rank; distload's "
                                            "options follow (python -m distload --help).")
    p.add_argument("--address", help="the Ray cluster to join (ray.init's address: auto, ray://host:port); "
                                     "default: start a local one")
    p.add_argument("--num-ranks", type=int, metavar="N", help="ranks (actors) to start; default tp x pp x (dp or 1)")
    p.add_argument("--placement-strategy", choices=STRATEGIES, default="PACK",
                   help="of the placement group, one bundle per rank (STRICT_PACK: all on one node)")
    p.add_argument("--master-addr", help="rendezvous address instead of the rank-0 actor's node IP")
    p.add_argument("--master-port", type=int, help="rendezvous port instead of a free one on rank 0's node")
    p.add_argument("--num-cpus", type=int, metavar="N",
                   help="CPUs of a local cluster started here (default: the cores, at least one per rank on CPU)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT, metavar="SECONDS",
                   help=f"wait this long for the cluster to place the ranks (default {READY_TIMEOUT:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(token in ("-h", "--help") for token in argv):
        launcher_parser().print_help()
        print()
    args, cli = launcher_parser().parse_known_args(argv)
    try:
        ranks = _invocations(cli, args.num_ranks)
    except ConfigError as err:
        return _usage_error(err)
    except SystemExit as done:  # --help, --version
        return int(done.code or 0)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for inv in ranks:
            Verdict(inv).started()
        return _run(ranks, args)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through _terminate
        signum = signal.SIGTERM if _sigterm.is_set() else signal.SIGINT
        return _everyone_failed(ranks, 128 + signum, DistloadError(f"interrupted: {signum.name} received"))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _invocations(cli: list[str], num_ranks: int | None) -> list[Invocation]:
    """distload's options, parsed as each rank of the world about to start would parse them: rank 0's
    alone, or every rank's when the --json path has {rank} (each rank writes its own file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    if "--dry-run" in cli:
        return [parse(cli, env, local_device=False)]
    first = parse(cli, env, local_device=False).config  # the layout options give the default world
    world = num_ranks if num_ranks is not None else first.tp * first.pp * (first.dp or 1)

    def as_rank(rank: int) -> Invocation:  # the rendezvous is the actors' own: MASTER_* only pass the check
        return parse(cli, {**env, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "ray",
                           "MASTER_PORT": "1"}, local_device=False)

    zero = as_rank(0)
    return [zero, *map(as_rank, range(1, world))] if zero.json_per_rank else [zero]


def _run(ranks: list[Invocation], args: argparse.Namespace) -> int:
    from distload.checkpoint.hub_cache import resolve_checkpoint
    from distload.examples import example_checkpoint

    inv = ranks[0]
    try:
        directory = resolve_checkpoint(inv.checkpoint) if inv.checkpoint else example_checkpoint()
        if inv.dry_run_world is not None:  # a plan from the headers: no actors needed
            from distload.dryrun import dry_run
            report = dry_run(directory, inv.config, world_size=inv.dry_run_world)
            return Verdict(inv).report(report, EXIT_OK if report.ok else EXIT_INCOMPLETE)
        # a layout that cannot fit: said before any actor starts, naming this launcher's option
        config = inv.config
        check_ranks(inv.world_size, tp=config.tp, pp=config.pp, dp=config.dp, start=RANKS_START)
        config.layout(inv.world_size)
        outcomes, err = _load_on_actors(directory, inv, args), None
    except DistloadError as failed:
        outcomes, err = getattr(failed, "outcomes", None), failed
    if outcomes is None:  # no rank ran (no cluster, no placement, a layout that does not fit)
        return _everyone_failed(ranks, None, err)
    return _each_rank(ranks, outcomes, err)


def _each_rank(ranks: list[Invocation], outcomes, err: DistloadError | None) -> int:
    """Every rank's verdict from its own outcome, as its torchrun process would give it (written
    for each rank of ``ranks``); one rank speaks: rank 0, or the one whose error ``load`` raised.
    Returns the speaker's exit code."""
    speaker = next((o.rank for o in outcomes if o.error is err), None) if err is not None else 0
    if speaker is None:  # the driver's own error: every rank that reported is lost
        speaker = reporter(err, ranks[0].world_size)
        return _verdict_of(ranks, speaker, speaks=True).raised(err)
    code = EXIT_ERROR
    for o in outcomes:
        if o.lost or not (o.rank == speaker or ranks[0].json_per_rank):
            continue  # a lost actor leaves its placeholder, as a killed process does
        out = _verdict_of(ranks, o.rank, speaks=o.rank == speaker)
        rank_code = out.report(o.report, EXIT_OK) if o.error is None else out.raised(o.error)
        code = rank_code if o.rank == speaker else code
    return code


def _everyone_failed(ranks: list[Invocation], code: int | None, err: DistloadError) -> int:
    """The verdict of a failure of the whole job (none of the ranks' own), in each rank's file; rank 0 speaks."""
    codes = []
    for inv in ranks:
        mine = copy.copy(err).with_rank(inv.rank)  # each rank's own copy names it
        out = Verdict(inv, speaks=inv.rank == 0)
        codes.append(out.raised(mine) if code is None else out.failed(code, mine))
    return codes[0]


def _verdict_of(ranks: list[Invocation], rank: int, *, speaks: bool) -> Verdict:
    """The verdict of ``rank``: with its own --json file when every rank writes one, else the one file."""
    inv = ranks[rank] if ranks[0].json_per_rank else dataclasses.replace(ranks[0], rank=rank)
    return Verdict(inv, speaks=speaks)


def _load_on_actors(directory: str, inv: Invocation, args: argparse.Namespace):
    import ray

    import distload.ray

    started = not ray.is_initialized()
    if started:
        _init(ray, args, inv)
    try:
        with distload.ray.load(directory, inv.config, num_ranks=inv.world_size, strategy=args.placement_strategy,
                               master_addr=args.master_addr, master_port=args.master_port,
                               progress=not inv.quiet, ready_timeout=args.ready_timeout) as model:
            return model.outcomes
    finally:
        if started:
            ray.shutdown()


def _init(ray, args: argparse.Namespace, inv: Invocation) -> None:
    local = {}
    if args.address is None:  # a cluster of this machine, for this run only
        cpus = args.num_cpus
        if cpus is None and inv.config.device != "cuda":  # logical CPUs: one bundle per rank must fit
            cpus = max(os.cpu_count() or 1, inv.world_size)
        local = {"num_cpus": cpus, "include_dashboard": False}
    try:
        ray.init(address=args.address, logging_level="WARNING", **local)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise DistloadError(f"could not start or join the Ray cluster {args.address or '(local)'}: {err}") from None
    except SystemExit as stop:  # SIGTERM while ray.init runs: Ray's handler calls sys.exit(15)
        if stop.code != signal.SIGTERM:
            raise
        _sigterm.set()
        raise KeyboardInterrupt from None
    # ray.init replaces the SIGTERM handler (with sys.exit, and its core worker's with an abort that
    # dumps a stack, exit 134): the driver's own comes back, so SIGTERM still ends in 143 and a verdict
    signal.signal(signal.SIGTERM, _terminate)


def _usage_error(err: ConfigError) -> int:
    print(f"distload: error: {err}", file=sys.stderr, flush=True)
    path = getattr(err, "json_path", None)
    if path:
        write_json(path, {**failure_json(None, None, EXIT_USAGE, 0), "error": error_json(err)}, rank=0)
    return EXIT_USAGE


def _terminate(signum, frame):
    _sigterm.set()
    # KeyboardInterrupt: the one exception Ray's blocking calls pass on (as a new one; any other
    # raised from a signal handler comes out of ray.get as a SystemError)
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
