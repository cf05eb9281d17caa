"""Cost of ``distload.track.merge``: the all-gather of each rank's sorted 64-bit key hashes (with their
second hashes and loaded bits), each rank's judgement of its hash range of their union, the sum
all-reduce over the checkpoint's tensors, and everything around them (hashing the keys, the
checkpoint fingerprint, classification), against an ``all_gather_object`` of each rank's expected
and loaded name sets in the same job (missing = union of expected - union of loaded).

Each rank expects piece r of W of K expert matrices (TP = world): K keys per rank, K x W units in
the union table, K checkpoint tensors. Both mechanisms must first agree on the one piece rank 0
leaves out; then they run alternately, ``--reps`` times after a warm-up; a repetition's time runs
from the last rank's entry to the last rank's exit. Prints one JSON line, writes
benchmarks/results/track_merge_w{W}_k{K}.json. Run from the repository root:

    .venv/bin/python benchmarks/track_merge_bench.py [--world 8] [--keys 200000] [--reps 5]
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
"""the merge should be at least this many times faster than the name-set baseline"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8, help="ranks (processes)")
    parser.add_argument("--keys", type=int, default=200_000, help="keys per rank")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from distload.testing import RankPool
    from tests.bench_jobs import track_merge_job

    pool = RankPool(args.world)
    try:
        start = time.perf_counter()
        out = pool.run(args.world, track_merge_job, args.keys, args.reps, timeout=1800, raise_errors=True)[0]
        wall = time.perf_counter() - start
    finally:
        pool.close()
    tr, base = statistics.median(out["track_s"]), statistics.median(out["baseline_s"])
    sent = out["bytes_handed_per_rank"]
    gathered = sent["track_agree"] + sent["track_keys"] + sent["track_parts"]
    track_bytes = gathered + sent["track_flags"]
    w = args.world
    result = {
        "benchmark": "track_merge", "world_size": w, "keys_per_rank": args.keys, "num_units": out["num_units"],
        "reps": args.reps, "backend": "gloo",
        "track_median_s": round(tr, 4), "baseline_median_s": round(base, 4), "ratio": round(base / tr, 2),
        "first_track_s": round(out["first_track_s"], 4),
        "target_ratio": TARGET_RATIO, "meets_target": base / tr >= TARGET_RATIO,
        "track_s": [round(x, 4) for x in out["track_s"]], "baseline_s": [round(x, 4) for x in out["baseline_s"]],
        "bytes_per_rank": {"track_handed": track_bytes, **sent,
                           # what a ring moves out of each rank: (W-1) rows of an all-gather, 2 (W-1) / W of a sum
                           "track_ring_sent": (w - 1) * gathered + 2 * (w - 1) * sent["track_flags"] // w,
                           "baseline_ring_sent": (w - 1) * sent["baseline"]},
        "peak_rss_mib": {"max_rank": round(max(out["rss_mib"]["peak"]), 1),
                         "max_rank_after_track_only": round(max(out["rss_mib"]["after_track"]), 1),
                         "sum_ranks": round(sum(out["rss_mib"]["peak"]), 1),
                         "max_rank_at_start": round(max(out["rss_mib"]["start"]), 1),
                         "max_rank_with_inputs": round(max(out["rss_mib"]["inputs"]), 1)},
        "job_wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
    }
    path = args.out or os.path.join(ROOT, "benchmarks", "results", f"track_merge_w{w}_k{args.keys}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"track merge of {args.keys} keys per rank at {w} ranks ({out['num_units']} units): {tr * 1e3:.0f} ms, "
          f"name sets {base * 1e3:.0f} ms, {result['ratio']}x (target >= {TARGET_RATIO:g}x); bytes handed per "
          f"rank {track_bytes / 2**20:.1f} MiB vs {sent['baseline'] / 2**20:.1f} MiB; peak RSS per rank "
          f"{result['peak_rss_mib']['max_rank_after_track_only']:.0f} MiB after the merge alone, "
          f"{result['peak_rss_mib']['max_rank']:.0f} MiB after the baseline too", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k not in ("track_s", "baseline_s")}))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
