"""The CLI run with a hook, as a program: ``python -m tests.cli_jobs READY_DIR -- CLI ARGS``.

Each rank pauses in the middle of its load (after the ranks have agreed, before its reads),
writes ``READY_DIR/rank-<r>``, and waits there (in Python, so a signal lands at once) until it
is signalled; the test then sends the signal it is about.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    ready, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    from distload import __main__ as cli
    from distload import execute

    def paused_run(self, *args, **kwargs):
        with open(os.path.join(ready, f"rank-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 120  # never forever, even if the test dies
        while time.monotonic() < deadline:
            if kwargs.get("abort_check"):
                kwargs["abort_check"]()  # a signalled peer ends this rank as a failed read would
            time.sleep(0.01)
        raise SystemExit("tests.cli_jobs: nobody signalled this rank")

    execute.Executor.run = paused_run
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
