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
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    sys.path.insert(0, ROOT)
    from benchmarks.synth_checkpoints import ensure_checkpoint
    directory = args.dir or ensure_checkpoint(args.preset)
    pairs = list(itertools.product(map(int, args.threads.split(",")), map(int, args.staging.split(","))))
    runs: dict[str, list[dict]] = {}
    for rep in range(args.runs):
        for threads, mib in (pairs if rep % 2 == 0 else pairs[::-1]):
            extra = json.dumps({"num_read_threads": threads, "staging_mib": mib})
            proc = subprocess.run([sys.executable, "-c", CHILD, directory, args.device, extra], capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
            if proc.returncode != 0:
                print(f"threads={threads} staging={mib}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["gbps"] = run["bytes"] / run["seconds"] / 1e9
            runs.setdefault(f"{threads}x{mib}", []).append(run)
            print(json.dumps({"threads": threads, "staging_mib": mib, **run}), flush=True)
    medians = {k: {"seconds": statistics.median(r["seconds"] for r in v),
                   "gbps": statistics.median(r["gbps"] for r in v), "runs": len(v)} for k, v in runs.items()}
    print(f"{'threads x MiB':>14} {'median s':>9} {'GB/s':>7}")
    for k, m in medians.items():
        print(f"{k:>14} {m['seconds']:9.3f} {m['gbps']:7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"directory": directory, "device": args.device, "runs": runs, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
