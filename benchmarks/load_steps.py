"""Where one load's time goes: each step of ``distload.load`` timed, one load per fresh process
(world 1, warm page cache), with the reader threads' and the copy thread's time split into
reading, waiting and the rest. The steps are timed by wrapping distload's functions in the
child; nothing in distload itself is changed.

Steps: ``prepare`` (build on the meta device and plan), ``materialize`` (parameters allocated
on the device), ``execute`` (the read step; on CUDA also: the pinned pool's allocation up to the
first copy, the tail after the last reader ended, the pool's release), ``merge`` and ``other``
(the rest of ``load``). Threads: per reader, seconds inside ``fill`` (``preadv``) and waiting for
a free slot; for the copy thread, seconds waiting for a full slot.

The per-chunk wrappers cost time under the interpreter lock, so a load timed here is slower
than the same load in ``load_bench.py``; compare two pipelines there, not here (an A/B made here
once favoured a compiled reader by 14% that ``load_bench.py`` then measured 4% behind).

    python benchmarks/load_steps.py --preset llama8b-7g --device cuda --runs 3
    python benchmarks/load_steps.py --preset tiny --device cpu --runs 1 --extra '{"num_read_threads": 2}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.fresh_runs import sweep  # noqa: E402

CHILD = r"""
import collections, functools, json, queue, statistics, sys, threading, time, torch
device = sys.argv[2]
if device == "cuda":
    torch.zeros(1, device="cuda")  # CUDA context before the clock, as an engine has it
import distload, distload.api as api, distload.staging as staging, distload.execute as execute
clock = time.perf_counter
steps = collections.defaultdict(float)
marks = {}
per_thread = collections.defaultdict(lambda: collections.defaultdict(float))

def timed(module, name, step):
    inner = getattr(module, name)
    @functools.wraps(inner)
    def wrapper(*a, **k):
        t = clock()
        marks.setdefault(step + "_start", t)
        try:
            return inner(*a, **k)
        finally:
            steps[step] += clock() - t
            marks[step + "_end"] = clock()
    setattr(module, name, wrapper)

def per_thread_timed(module, name, what):
    inner = getattr(module, name)
    def wrapper(*a, **k):
        t = clock()
        try:
            return inner(*a, **k)
        finally:
            per_thread[threading.current_thread().name][what] += clock() - t
    setattr(module, name, wrapper)

class Queue(queue.SimpleQueue):  # the copy thread's waits for a full slot
    def get(self, block=True, timeout=None):
        t = clock()
        try:
            return super().get(block, timeout)
        finally:
            if block:
                per_thread[threading.current_thread().name]["get"] += clock() - t

class QueueModule:
    SimpleQueue = Queue
    Empty = queue.Empty

staging.queue = QueueModule
for module, name in ((api, "prepare"), (api, "materialize"), (api, "_merge"), (staging, "open_copies"),
                     (staging, "release_pinned"), (staging, "_copy")):
    timed(module, name, name.strip("_"))
executor_run = api.Executor.run
def run(self, *a, **k):
    t = clock()
    marks["execute_start"] = t
    try:
        return executor_run(self, *a, **k)
    finally:
        steps["execute"] += clock() - t
api.Executor.run = run
per_thread_timed(staging, "fill", "fill")
per_thread_timed(execute, "fill", "fill")
per_thread_timed(staging, "_take", "take")
reader = staging._reader
def reader_timed(*a, **k):
    try:
        return reader(*a, **k)
    finally:
        marks.setdefault("readers_end", 0.0)
        marks["readers_end"] = max(marks["readers_end"], clock())
staging._reader = reader_timed
extra = json.loads(sys.argv[3])
for target, value in extra.pop("_patch", {}).items():  # an A/B of a module constant: {"distload.x.NAME": v}
    module, _, attr = target.rpartition(".")
    setattr(sys.modules[module], attr, value)
t0 = clock()
loaded = distload.load(sys.argv[1], distload.LoadConfig(device=device, extra_config=extra))
if device == "cuda":
    torch.cuda.synchronize()
seconds = clock() - t0
r = loaded.report.ranks[0]
out = {"seconds": seconds, "complete": loaded.report.complete, "bytes": r.bytes_read, "read_seconds": r.seconds}
out.update({k: round(v, 5) for k, v in steps.items()})
out["other"] = round(seconds - sum(steps[k] for k in ("prepare", "materialize", "execute", "merge")), 5)
if "copy_start" in marks:
    out["pool_until_copier"] = round(marks["copy_start"] - marks["execute_start"], 5)
    out["tail_after_readers"] = round(marks["copy_end"] - marks.get("readers_end", marks["copy_end"]), 5)
readers = [v for k, v in per_thread.items() if k.startswith("distload-read")]
out["readers"] = len(readers)
for what in ("fill", "take"):
    out[f"reader_{what}_mean"] = round(statistics.mean(v[what] for v in readers), 5) if readers else 0.0
out["copier_get"] = round(per_thread["MainThread"]["get"], 5)
print(json.dumps(out))
"""

SHOWN = ("seconds", "prepare", "materialize", "execute", "merge", "other", "pool_until_copier", "copy",
         "tail_after_readers", "release_pinned", "reader_fill_mean", "reader_take_mean", "copier_get")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama8b-7g")
    p.add_argument("--dir", help="checkpoint directory (default: the preset's, written if absent)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--extra", action="append", default=[],
                   help="an extra-config JSON object per setting (repeatable; default: {}); its key "
                        "\"_patch\" sets module constants instead, e.g. {\"_patch\": {\"distload.staging.X\": 1}}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write every run and the medians here (JSON)")
    args = p.parse_args(argv)
    from benchmarks.synth_checkpoints import ensure_checkpoint
    directory = args.dir or ensure_checkpoint(args.preset)
    settings = [(extra, [directory, args.device, extra]) for extra in (args.extra or ["{}"])]
    runs = sweep(CHILD, settings, args.runs)
    table = {name: {k: statistics.median(r[k] for r in v) for k in SHOWN if all(k in r for r in v)}
             for name, v in runs.items()}
    for name, row in table.items():
        print(name + ": " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"directory": directory, "device": args.device, "runs": runs, "medians": table}, f, indent=1)
    return 0 if all(r["complete"] for v in runs.values() for r in v) else 1


if __name__ == "__main__":
    sys.exit(main())
