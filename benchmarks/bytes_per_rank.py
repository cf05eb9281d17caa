"""Bytes each rank requests in a real tensor-parallel load, against its fair share.

Writes a synthetic Llama-shaped bf16 checkpoint (hidden 1024, 4 layers, 16 heads,
8 KV heads, intermediate 2816, vocab 32000; ~225 MB), loads it with distload at
world = tp (gloo on CPU, one process per rank) and prints, per rank, the bytes the
executor requested, the rank's share (1/tp of every sharded tensor, k/v cut into
min(tp, kv heads) pieces, plus every replicated norm, computed from the shapes
alone) and their ratio. ``rchar`` is the process's read()/pread() byte count over
the load (headers, config and gloo sockets included): an independent cross-check,
taken from a second load so that module imports of the first are not counted.
Writes benchmarks/results/bytes_per_rank.json; exits 1 if a ratio exceeds 1.1.

Run from the repository root:
    .venv/bin/python benchmarks/bytes_per_rank.py [--tp 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BOUND = 1.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel degree (= world size)")
    parser.add_argument("--dir", help="write the checkpoint here (default: a temporary directory, removed)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bytes_per_rank.json"))
    args = parser.parse_args(argv)

    from distload.testing import RankPool
    from tests.bench_jobs import byte_shares, load_bytes_job
    from tests.synthetic import write_llama_checkpoint
    from tests.test_bytes_per_rank import CFG

    directory = args.dir or tempfile.mkdtemp(prefix="distload-bytes-")
    os.makedirs(directory, exist_ok=True)
    pool = None
    try:
        start = time.perf_counter()
        shapes = write_llama_checkpoint(directory, CFG)
        write_s = time.perf_counter() - start
        pool = RankPool(args.tp)
        # the first load in fresh workers also reads the modules it imports (counted in rchar)
        pool.run(args.tp, load_bytes_job, directory, args.tp, timeout=600, raise_errors=True)
        out = pool.run(args.tp, load_bytes_job, directory, args.tp, timeout=600, raise_errors=True)
    finally:
        if pool is not None:
            pool.close()
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    report = out[0]["report"]
    shares = byte_shares(shapes, CFG, args.tp, itemsize=2)
    share = shares["share_bytes"]
    ranks = [{"rank": r["rank"], "bytes_read": r["bytes_read"], "share_bytes": share,
              "ratio": round(r["bytes_read"] / share, 4), "rchar": out[r["rank"]]["rchar"],
              "seconds": r["seconds"]} for r in report["ranks"]]
    worst = max(r["ratio"] for r in ranks)
    result = {"benchmark": "bytes_per_rank", "config": CFG, "tp": args.tp, "world_size": args.tp,
              "complete": report["complete"], "checkpoint_bytes": shares["sharded_bytes"] + shares["replicated_bytes"],
              **shares, "max_ratio": worst, "bound": BOUND, "within_bound": worst <= BOUND,
              "write_s": round(write_s, 2), "ranks": ranks}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    mib = 1 << 20
    print(f"checkpoint {result['checkpoint_bytes'] / mib:.1f} MiB, tp={args.tp}: share per rank "
          f"{share / mib:.2f} MiB (sharded/{args.tp} + replicated {shares['replicated_bytes'] / 1024:.1f} KiB)",
          file=sys.stderr)
    print(f"{'rank':>4} {'requested MiB':>14} {'share MiB':>10} {'ratio':>7} {'rchar MiB':>10}", file=sys.stderr)
    for r in ranks:
        rchar = f"{r['rchar'] / mib:10.2f}" if r["rchar"] is not None else f"{'n/a':>10}"
        print(f"{r['rank']:>4} {r['bytes_read'] / mib:14.2f} {share / mib:10.2f} {r['ratio']:7.4f} {rchar}",
              file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k not in ("ranks", "config")}))
    return 0 if result["within_bound"] and report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
