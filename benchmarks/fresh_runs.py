"""The loop both sweeps share: each setting's load in a fresh process, settings in alternating
order from one repetition to the next, one JSON line out of each child, medians at the end."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""the checkout: the children import distload from it"""


def sweep(child: str, settings: Sequence[tuple[str, list[str]]], runs: int) -> dict[str, list[dict]]:
    """Runs ``python -c child *args`` for each ``(name, args)`` of ``settings``, ``runs`` times over.

    The child prints a JSON object with ``seconds`` and ``bytes`` last; a failed child is reported
    on stderr and left out. Returns each setting's runs (with ``gbps`` added), printing each as it
    comes."""
    out: dict[str, list[dict]] = {}
    for rep in range(runs):
        for name, args in (settings if rep % 2 == 0 else settings[::-1]):
            proc = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PYTHONPATH": ROOT})
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["gbps"] = run["bytes"] / run["seconds"] / 1e9
            out.setdefault(name, []).append(run)
            print(json.dumps({"setting": name, **run}), flush=True)
    return out


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each setting's median seconds and GB/s, printed as a table."""
    table = {k: {"seconds": statistics.median(r["seconds"] for r in v), "gbps": statistics.median(r["gbps"] for r in v),
                 "runs": len(v)} for k, v in runs.items()}
    width = max((len(k) for k in table), default=8)
    for k, m in table.items():
        print(f"{k:>{width}}: median {m['seconds']:.3f} s {m['gbps']:6.2f} GB/s ({m['runs']} runs)")
    return table
