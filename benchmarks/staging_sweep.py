"""Tunes distload's reader threads and staging budget: one load per fresh process at world 1,
for each (threads, staging MiB) pair, in alternating order, warm page cache.

Each run times from after ``import torch`` and CUDA start-up (a serving engine has both
before it loads) to the moment the parameters are on the device; the load is checked
complete. Prints one JSON line per run and a table of medians last.

    python benchmarks/staging_sweep.py --preset llama8b-7g --device cuda --threads 8,16 --staging 64,256 --runs 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.fresh_runs import medians, sweep  # noqa: E402

CHILD = r"""
import json, sys, time, torch
device = sys.argv[2]
if device == "cuda":
    torch.zeros(1, device="cuda")  # CUDA context before the clock, as an engine has it
import distload
extra = json.loads(sys.argv[3])
t0 = time.perf_counter()
loaded = distload.load(sys.argv[1], distload.LoadConfig(device=device, extra_config=extra))
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
r = loaded.report.ranks[0]
print(json.dumps({"seconds": seconds, "complete": loaded.report.complete, "bytes": r.bytes_read,
                  "read_seconds": r.seconds, "staging_bytes": r.staging_bytes}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama8b-7g")
    p.add_argument("--dir", help="checkpoint directory (default: the preset's, written if absent)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--threads", default="8,16")
    p.add_argument("--staging", default="64,256", help="staging budgets in MiB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write every run and the medians here (JSON)")
    args = p.parse_args(argv)
    from benchmarks.synth_checkpoints import ensure_checkpoint
    directory = args.dir or ensure_checkpoint(args.preset)
    pairs = list(itertools.product(map(int, args.threads.split(",")), map(int, args.staging.split(","))))
    settings = [(f"{threads}x{mib}", [directory, args.device, json.dumps({"num_read_threads": threads,
                                                                            "staging_mib": mib})])
                for threads, mib in pairs]
    runs = sweep(CHILD, settings, args.runs)
    table = medians(runs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"directory": directory, "device": args.device, "runs": runs, "medians": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
