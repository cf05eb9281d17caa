"""``python -m distload.run --nproc-per-node N [torchrun options] [CHECKPOINT] [distload options]``.

torchrun through torch's own elastic launch API, with distload's verdict as the exit
code: torchrun turns any failing worker into its own exit 1 and prints a failure
dump, so a CI job cannot tell an incomplete checkpoint (3) from a crash. Here the
code is the first failing rank's (as torch's launcher records it): 0 complete,
3 incomplete, 1 a failure, 2 a usage error, 130 / 143 interrupted; a rank ended
by another signal gives 128 + that signal. The ranks print the report themselves
(rank 0, or the reporting rank); the launcher adds a line only for a crash.
Restarts stay off (``--max-restarts 0``, torchrun's default): a finding would only
repeat. With several nodes, each node's launcher returns its own node's code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from .errors import ConfigError, LayoutError
from .options import parse

_NOT_HERE = ("-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")
"""torchrun options that choose the program: distload.run always runs distload"""


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits a command line into torchrun's options and distload's (everything else).

    Example:
        >>> split_argv(["--nproc-per-node", "4", "ckpt", "--tp", "2", "--max-restarts=0"])
        (['--nproc-per-node', '4', '--max-restarts=0'], ['ckpt', '--tp', '2'])

    Raises:
        ConfigError: an option that would run another program than distload.
    """
    takes_value = _torchrun_options()
    launcher, cli = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in _NOT_HERE:
            raise ConfigError(f"{name} is a torchrun option that picks the program; distload.run always runs "
                              "distload (use torchrun itself for other programs)")
        if name in takes_value:
            launcher.append(token)
            if takes_value[name] and "=" not in token and i + 1 < len(argv):
                launcher.append(argv[i + 1])
                i += 1
        else:
            cli.append(token)
        i += 1
    return launcher, cli


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = sys.argv[1:] if argv is None else argv
    try:
        launcher, cli = split_argv(argv)
        args = torchrun.parse_args([*launcher, "--module", "distload", *cli])
        _check_options(cli, args)
    except (ConfigError, LayoutError) as err:
        print(f"distload.run: error: {err}", file=sys.stderr, flush=True)
        return 2
    # c10d prints a C++ stack for every lost connection; the ranks name the lost rank themselves
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    _mute_launcher_logs()
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        return _exit_code(rank, failure.exitcode)
    except SignalException as err:
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


_LAUNCHER_LOGS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")
"""torch's launcher's loggers: they log every failing worker with its own dump, and a signal's
"Received 2 death signal" line; the ranks say what failed, once"""


def _mute_launcher_logs() -> None:
    """Raises torch's launcher loggers to CRITICAL. Each of its modules sets its own logger's level
    (``LOGLEVEL``, default WARNING), so a parent's level does not reach them: every logger made so
    far under those names is set (``torch.distributed.run`` has imported them all)."""
    known = [n for n in logging.root.manager.loggerDict if n.startswith(tuple(f"{p}." for p in _LAUNCHER_LOGS))]
    for name in (*_LAUNCHER_LOGS, *known):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _check_options(cli: list[str], args) -> None:
    """distload's options, checked once here as every rank will check them, before any rank starts."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes
    if any(token in ("-h", "--help", "--version") for token in cli):
        return  # each rank prints it; nothing to check
    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    world = max_nodes * determine_local_world_size(args.nproc_per_node)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    if "--dry-run" in cli:
        env.pop("WORLD_SIZE")
        parse(cli, env)
        return
    parse(cli, env).config.layout(world)  # a layout that cannot fit: said once, not by every rank


def _exit_code(rank: int, code: int) -> int:
    if code >= 0:
        return code
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    print(f"distload.run: rank {rank} ended by {name}", file=sys.stderr, flush=True)
    return 128 - code


def _torchrun_options() -> dict[str, bool]:
    """torchrun's option strings -> whether each takes a value (read from its own parser)."""
    from torch.distributed.run import get_args_parser
    out = {}
    for action in get_args_parser()._actions:
        for name in action.option_strings:
            if name not in ("-h", "--help"):
                out[name] = action.nargs != 0
    return out


if __name__ == "__main__":
    sys.exit(main())
