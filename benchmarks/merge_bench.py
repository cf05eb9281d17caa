"""Cost of the tracking merge: distload's count vector + one all_reduce, against gathering
every rank's set of loaded unit names with all_gather_object and taking their union.

Both run in the same job (8 gloo ranks on CPU by default), alternating, on the same
unit table: 100,000 units, MoE expert matrices each cut into tp=8 shards, so each rank
loaded 12,500 of them. A repetition's time runs from the moment the last rank enters
the merge to the moment the last rank leaves it (a collective cannot finish before its
last rank arrives, so this leaves out the skew with which ranks leave the preceding
barrier); the slowest rank's own time is reported too. The script reports the median
of each and their ratio, prints one JSON line and writes benchmarks/results/merge.json.
It also times an all_reduce of 8 integers, the latency floor of any collective on the
machine, which both mechanisms pay.

Run from the repository root:
    .venv/bin/python benchmarks/merge_bench.py [--units 100000] [--world 8] [--tp 8] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_RATIO = 10.0
"""distload's merge should be at least this many times cheaper than the name-set baseline"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=100_000, help="units in the table (multiple of --tp)")
    parser.add_argument("--world", type=int, default=8, help="ranks (processes)")
    parser.add_argument("--tp", type=int, default=8, help="shards per tensor; dp = world / tp")
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (after one warm-up)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "merge.json"))
    args = parser.parse_args(argv)

    import torch

    from distload.testing import RankPool
    from tests.bench_jobs import merge_job

    pool = RankPool(args.world)
    try:
        start = time.perf_counter()
        out = pool.run(args.world, merge_job, args.units, args.tp, args.reps, timeout=900, raise_errors=True)[0]
        wall = time.perf_counter() - start
    finally:
        pool.close()
    dl, base = statistics.median(out["distload_s"]), statistics.median(out["baseline_s"])
    floor = statistics.median(out["floor_s"])
    slow = {n: statistics.median(out[f"{n}_slowest_rank_s"]) for n in ("distload", "baseline", "floor")}
    result = {
        "benchmark": "merge", "num_units": out["num_units"], "world_size": args.world, "tp": args.tp,
        "units_per_rank": out["units_per_rank"], "reps": args.reps, "backend": "gloo",
        "distload_median_s": round(dl, 6), "baseline_median_s": round(base, 6),
        "ratio": round(base / dl, 2), "target_ratio": TARGET_RATIO, "meets_target": base / dl >= TARGET_RATIO,
        "collective_floor_median_s": round(floor, 6),
        "ratio_above_floor": round((base - floor) / max(dl - floor, 1e-9), 2),
        "distload_s": [round(x, 6) for x in out["distload_s"]],
        "baseline_s": [round(x, 6) for x in out["baseline_s"]],
        "floor_s": [round(x, 6) for x in out["floor_s"]],
        "slowest_rank_median_s": {n: round(v, 6) for n, v in slow.items()},
        "slowest_rank_ratio": round(slow["baseline"] / slow["distload"], 2),
        "job_wall_s": round(wall, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"merge of {result['num_units']} units at {args.world} ranks (tp={args.tp}): "
          f"distload {dl * 1e3:.1f} ms, all_gather_object of name sets {base * 1e3:.1f} ms, "
          f"{result['ratio']}x (target >= {TARGET_RATIO:g}x); one 8-int all_reduce alone: {floor * 1e3:.1f} ms",
          file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k not in ("distload_s", "baseline_s", "floor_s")}))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
