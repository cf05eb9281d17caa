"""Load speed of distload against peer loaders and the machine's floor, on synthetic HF checkpoints.

Each measured load runs in a FRESH set of processes, one per rank (``python -m
benchmarks.load_worker`` with torchrun's variables, OMP_NUM_THREADS=1). A run's time is from
the moment the last rank passed the barrier to the moment the slowest rank holds its filled
parameters (max t1 - max t0, CLOCK_MONOTONIC); no warm-up load is left out, loader order
alternates between runs. Per run: time, planned bytes per rank, per-node ``read_bytes`` and
``rchar`` (sums of the ranks' ``/proc/self/io`` deltas), GB/s, CPU seconds (user + sys, summed
over ranks), peak RSS per rank, staging / pinned bytes where known, distload's merge time and
its report. Summary: medians over runs and each loader's time over the floor's, same invocation.
Cold runs evict the checkpoint from the page cache first and check with mincore that < 1% is
resident; where that fails the run is recorded "cold not measurable". Writes JSON (``--out``)
after every run and prints a compact table last.

    .venv/bin/python benchmarks/load_bench.py --preset llama-1.4g --worlds 1,2,4,8 \\
        --loaders distload,engine,eager,fastsafetensors,floor --runs 5 [--cold] [--device cpu|cuda] \\
        [--layout tp|tp2dp] [--runs-for eager=2] [--budget-s 600] [--out benchmarks/results/load_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import page_cache, synth_checkpoints  # noqa: E402
from benchmarks.bench_report import (DEFINITIONS, machine_info, print_table, summarize,  # noqa: E402
                                     summarize_run)


def layout_for(world: int, kind: str) -> tuple[int, int]:
    if kind == "tp":
        return world, 1
    if world % 2:
        raise SystemExit(f"--layout tp2dp needs an even world, got {world}")
    return 2, world // 2


def planned_bytes(directory: str, world: int, tp: int, dp: int) -> tuple[list[int], int]:
    """Per-rank planned bytes and the job's distinct bytes, from distload's plan (headers only)."""
    import torch
    from benchmarks.bench_ctx import Ctx
    ctx = Ctx(directory=directory, rank=0, world=world, local_rank=0, local_world=world, tp=tp, dp=dp,
              device=torch.device("cpu"))
    ctx.plan_only()
    per_rank, seen = [], set()
    for r in range(world):
        reads = [x for x in ctx.plan.for_rank(r).reads if not x.verify]
        per_rank.append(sum(x.nbytes for x in reads))
        seen |= {(x.tensor.name, x.offset, x.run, x.stride, x.count) for x in reads}
    return per_rank, sum(run * count for _, _, run, _, count in seen)


def spawn(args, loader: str, world: int, tp: int, dp: int, timeout: float) -> list[dict] | str:
    """Runs one load on ``world`` fresh processes; returns per-rank results, or an error text."""
    from distload.testing import free_port
    tmp = tempfile.mkdtemp(prefix="load-bench-")
    port = str(free_port())
    procs = []
    spawned = time.clock_gettime(time.CLOCK_MONOTONIC)
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "benchmarks.load_worker", "--dir", args.dir, "--loader", loader,
               "--tp", str(tp), "--dp", str(dp), "--device", args.device, "--check", str(args.check),
               "--result", os.path.join(tmp, f"rank{rank}.json")] + (["--cold"] if args.cold else [])
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    errors = _wait(procs, timeout)
    exited = time.clock_gettime(time.CLOCK_MONOTONIC)
    results = []
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            os.remove(path)
    os.rmdir(tmp) if not os.listdir(tmp) else None
    failed = [r for r in results if "error" in r]
    if failed:
        return f"rank {failed[0]['rank']}: {failed[0]['error']}\n{failed[0].get('traceback', '')[-1500:]}"
    if len(results) < world:
        return errors or f"only {len(results)} of {world} ranks wrote a result"
    for r in results:  # where the untimed part of the run's wall time went
        r["phases"] = {k: round(v - spawned, 3) for k, v in r.get("phases", {}).items()}
        r["phases"]["exited"] = round(exited - spawned, 3)
    return results


def _wait(procs: list[subprocess.Popen], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    errors = ""
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, 9)  # each worker leads its own session: only ours are killed
            return f"timed out after {timeout:.0f} s"
        if p.returncode != 0 and not errors:
            errors = f"rank {rank} exited {p.returncode}: {(err or '')[-1500:]}"
    return errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-1.4g", choices=sorted(synth_checkpoints.PRESETS))
    p.add_argument("--dir", help="checkpoint directory (default: the preset's cache directory)")
    p.add_argument("--worlds", default="1", help="comma-separated world sizes")
    p.add_argument("--loaders", default="distload,engine,eager,fastsafetensors,floor")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--runs-for", default="", help="per-loader run counts, e.g. eager=2,load_file=3")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--layout", default="tp", choices=("tp", "tp2dp"), help="tp: TP = world; tp2dp: TP 2 x DP world/2")
    p.add_argument("--check", type=int, default=3, help="parameter slices each rank compares with the checkpoint")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take, start to exit")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--out", help="result JSON (default: "
                   "benchmarks/results/load_<device>_<preset>_<layout>_<mode>.json)")
    return p.parse_args(argv)


def write_manifest(directory: str) -> None:
    """Runs ``python -m distload.manifest DIRECTORY``, the only writer into a checkpoint folder.

    Raises:
        RuntimeError: the command failed (its stderr).
    """
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "distload.manifest", directory], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"python -m distload.manifest {directory} failed: {done.stderr.strip()}")
    print(done.stdout.strip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.loaders import unavailable
    args = parse_args(argv)
    start = time.monotonic()
    mode = "cold" if args.cold else "warm"
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        f"load_{args.device}_{args.preset}_{args.layout}_{mode}.json")
    args.dir = synth_checkpoints.ensure_checkpoint(args.preset, args.dir)
    files = synth_checkpoints.weight_files(args.dir)
    loaders = [n for n in args.loaders.split(",") if n]
    not_run = {n: f"not run: {why}" for n in loaders if (why := unavailable(n, args.device))}
    runnable = [n for n in loaders if n not in not_run]
    runs_for = {k: int(v) for k, v in (x.split("=") for x in args.runs_for.split(",") if x)}
    result = {"benchmark": "load", "machine": machine_info(args.device), "preset": args.preset,
              "checkpoint": {"directory": args.dir, "files": len(files), "bytes": sum(map(os.path.getsize, files))},
              "device": args.device, "layout": args.layout, "mode": mode, "definitions": DEFINITIONS,
              "loaders": loaders, "not_run": not_run,
              "runs_per_loader": {n: runs_for.get(n, args.runs) for n in runnable},
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": [], "summary": {}}
    if "distload_verify" in runnable:  # its reference digests, written untimed by the one command that writes
        write_manifest(args.dir)        # into a checkpoint folder
    if not args.cold:
        result["warm_check"] = page_cache.make_warm(files)
    for world in [int(w) for w in args.worlds.split(",")]:
        tp, dp = layout_for(world, args.layout)
        per_rank, unique = planned_bytes(args.dir, world, tp, dp)
        for i in range(max(result["runs_per_loader"].values(), default=0)):
            order = runnable if i % 2 == 0 else runnable[::-1]
            for name in order:
                if i >= result["runs_per_loader"][name]:
                    continue
                record = {"world": world, "tp": tp, "dp": dp, "loader": name, "run": i}
                if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                    record["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
                    result["runs"].append(record)
                    continue
                record.update(_one_run(args, name, world, tp, dp, files, sum(per_rank), unique))
                result["runs"].append(record)
                _log(record)
                result["summary"] = summarize(result["runs"], loaders)
                _write(args.out, result)
    result["summary"] = summarize(result["runs"], loaders)
    result["wall_seconds"] = round(time.monotonic() - start, 1)
    _write(args.out, result)
    print_table(result)
    return 0


def _one_run(args, name: str, world: int, tp: int, dp: int, files: list[str], needed: int, unique: int) -> dict:
    record: dict = {"needed_bytes": needed, "unique_bytes": unique}
    if not args.cold:
        record["resident_before"] = round(page_cache.resident_fraction(files), 5)
    if args.cold:
        record["cold_check"] = page_cache.make_cold(files)
        if not record["cold_check"]["cold"]:
            record["seconds"] = None
            record["error"] = "cold not measurable: eviction left " \
                              f"{record['cold_check']['resident_after']:.1%} of the checkpoint resident"
            return record
    ranks = spawn(args, name, world, tp, dp, args.timeout)
    if isinstance(ranks, str):
        record["seconds"] = None
        record["error"] = ranks
        return record
    record.update(summarize_run(ranks, needed, unique))
    if not record["check_ok"]:  # a loader that filled wrong bytes reports no time
        record["unchecked_seconds"], record["seconds"] = record["seconds"], None
        record["error"] = f"check failed: {record['check']}"
    return record


def _log(r: dict) -> None:
    what = f"{r['seconds']:.3f} s {r['gbps']:.2f} GB/s" if r.get("seconds") is not None else r.get("error", "")[:300]
    print(f"world {r['world']} {r['loader']:>15} run {r['run']}: {what}", file=sys.stderr, flush=True)


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
