"""Two knobs of the CUDA read pipeline that are not options: the pinned slot size (with the
number of reader threads) and the interpreter's GIL switch interval. One load per fresh process
at world 1, warm page cache, settings in alternating order; distload alone (ratios to peers come
from load_bench.py).

Each run times from after ``import torch`` and CUDA start-up to the parameters on the device, and
is checked complete. Prints one line per run and a table of medians last.

    python benchmarks/cuda_knobs_sweep.py slots --slot-mib 2,4,8 --readers 8,16 --runs 3
    python benchmarks/cuda_knobs_sweep.py switch --interval-ms 5,0.2 --runs 11
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
torch.zeros(1, device="cuda")  # CUDA context before the clock, as an engine has it
import distload, distload.execute as execute
directory, slot_mib, readers, interval_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
execute.CUDA_SLOT_BYTES = slot_mib << 20  # read when the executor is made, inside load()
sys.setswitchinterval(interval_ms / 1000)
extra = {"num_read_threads": readers, "staging_mib": max(64, 2 * readers * slot_mib)}
t0 = time.perf_counter()
loaded = distload.load(directory, distload.LoadConfig(device="cuda", extra_config=extra))
torch.cuda.synchronize()
seconds = time.perf_counter() - t0
r = loaded.report.ranks[0]
print(json.dumps({"seconds": seconds, "complete": loaded.report.complete, "bytes": r.bytes_read,
                  "staging_bytes": r.staging_bytes}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("knob", choices=("slots", "switch"))
    p.add_argument("--preset", default="llama8b-7g")
    p.add_argument("--dir", help="checkpoint directory (default: the preset's, written if absent)")
    p.add_argument("--slot-mib", default="2,4", help="slot sizes (slots)")
    p.add_argument("--readers", default="8", help="reader threads (slots)")
    p.add_argument("--interval-ms", default="5,0.2", help="GIL switch intervals (switch; 5 is the default)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write every run and the medians here (JSON)")
    args = p.parse_args(argv)
    from benchmarks.synth_checkpoints import ensure_checkpoint
    directory = args.dir or ensure_checkpoint(args.preset)
    if args.knob == "slots":
        settings = [(s, r, 5.0) for s, r in itertools.product(map(int, args.slot_mib.split(",")),
                                                               map(int, args.readers.split(",")))]
    else:
        settings = [(2, 8, float(ms)) for ms in args.interval_ms.split(",")]
    runs = sweep(CHILD, [(f"slot {slot} MiB x {readers} readers, switch {ms:g} ms",
                          [directory, str(slot), str(readers), str(ms)]) for slot, readers, ms in settings], args.runs)
    table = medians(runs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"directory": directory, "runs": runs, "medians": table}, f, indent=1)
    return 0 if all(r["complete"] for v in runs.values() for r in v) else 1


if __name__ == "__main__":
    sys.exit(main())
