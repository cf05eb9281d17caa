"""What pinning host memory costs on this machine, in a fresh process after CUDA start-up: the
first pinned allocation, each of the slots a CUDA rank's staging pool is cut into, one block of
the pool's size, and freeing them (torch's cache of freed pinned blocks emptied). The staging
pool pins its slots one at a time beside the planning because of these figures
(``distload.staging.SlotPool``).

    python benchmarks/pin_cost.py [--slot-mib 2] [--slots 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time, torch
torch.zeros(1, device="cuda")
from distload.staging import release_pinned
slot, count = int(sys.argv[1]) << 20, int(sys.argv[2])
clock = time.perf_counter
times = []
slots = []
for _ in range(count):
    t = clock()
    slots.append(torch.empty(slot, dtype=torch.uint8, pin_memory=True))
    times.append(clock() - t)
t = clock()
slots.clear()
release_pinned()
free_slots = clock() - t
t = clock()
block = torch.empty(slot * count, dtype=torch.uint8, pin_memory=True)
one_block = clock() - t
t = clock()
del block
release_pinned()
free_block = clock() - t
print(json.dumps({"first_slot": times[0], "later_slots_mean": sum(times[1:]) / max(1, count - 1),
                  "all_slots": sum(times), "free_slots": free_slots, "one_block": one_block,
                  "free_block": free_block}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slot-mib", type=int, default=2)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    runs = []
    for _ in range(args.runs):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.slot_mib), str(args.slots)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"{args.slots} x {args.slot_mib} MiB, median of {len(runs)} fresh processes (ms): "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
