"""Markdown tables of load_bench results (the tables in BENCHMARKS.md).

    python benchmarks/tables.py benchmarks/results/load_cpu_*.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = ("median s", "GB/s", "x floor", "x floor_fresh", "CPU s", "+RSS MiB", "read GB", "merge s", "8-int all_reduce s")


def table(result: dict) -> str:
    """One markdown table per result file: a row per (world, loader)."""
    m, ckpt = result["machine"], result["checkpoint"]
    head = (f"**{result['preset']}** ({ckpt['bytes'] / 1e9:.2f} GB, {ckpt['files']} files), {result['device']}, "
            f"layout {result['layout']}, {result['mode']}; {m['cores']} cores, {m.get('gpu') or m['cpu']}; "
            f"medians of the runs shown")
    rows = [head, "", "| world | loader | runs | " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * (3 + len(COLUMNS))]
    for world, per in result["summary"].items():
        for name, s in per.items():
            cells = [f"{s['seconds']:.3f}", f"{s['gbps']:.2f}", _f(s.get("vs_floor"), 2), _f(s.get("vs_floor_fresh"), 2),
                     f"{s['cpu_seconds']:.2f}", _f(_mib(s.get("rss_growth_per_rank")), 0),
                     _f(None if s.get("read_bytes_node") is None else s["read_bytes_node"] / 1e9, 2),
                     _f(s.get("merge_seconds"), 4), _f(s.get("allreduce8_seconds"), 4)]
            rows.append(f"| {world} | {name} | {s['runs']} | " + " | ".join(cells) + " |")
    for name, why in result.get("not_run", {}).items():
        rows.append(f"\n{name}: not run ({why})")
    return "\n".join(rows)


def _mib(n):
    return None if n is None else n / 2**20


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            print(table(json.load(f)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
