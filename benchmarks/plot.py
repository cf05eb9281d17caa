"""Plots of load_bench.py results: GB/s by loader against the floor, and GB/s against world size.

From each results JSON, one bar figure (a panel per world size): every loader's median GB/s,
the floor's drawn as a dashed line across the panel, each bar labelled with its GB/s and its
time over the floor's. Results of one setting (machine, device, preset, layout, warm/cold)
across files and world sizes also make one line figure: median GB/s against world size, a line
per loader. GB/s is the JSON's ``gbps``: checkpoint bytes the ranks need / time (see its
``definitions``). Needs matplotlib.

    .venv/bin/python benchmarks/plot.py benchmarks/results/load_*.json [--outdir benchmarks/results/plots]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

COLORS = {"distload": "#1f77b4", "floor": "#7f7f7f", "floor_fresh": "#8c564b", "h2d": "#bcbd22", "engine": "#ff7f0e", "eager": "#d62728",
          "load_file": "#9467bd", "fastsafetensors": "#2ca02c", "instanttensor": "#17becf"}


def load_results(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if r.get("benchmark") == "load" and r.get("summary"):
            r["_path"] = p
            out.append(r)
    return out


def setting(r: dict) -> tuple:
    m = r["machine"]
    return (m.get("hostname"), r["device"], r["preset"], r["layout"], r["mode"])


def title(r: dict) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m.get('cores')} cores"
    return (f"{r['preset']} ({r['checkpoint']['bytes'] / 1e9:.2f} GB), {r['device']}, {r['layout']}, {r['mode']}\n"
            f"{where}, {m.get('cpu') or ''}")


def bars(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    worlds = list(r["summary"])
    fig, axes = plt.subplots(1, len(worlds), figsize=(max(6.0, 4.5 * len(worlds)), 4.6), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        per = r["summary"][world]
        names = [n for n in r["loaders"] if n in per and n != "floor"]
        values = [per[n]["gbps"] for n in names]
        ax.bar(range(len(names)), values, color=[COLORS.get(n, "#333333") for n in names])
        for i, n in enumerate(names):
            vf = per[n].get("vs_floor")
            label = f"{values[i]:.2f}" + (f"\n{vf:.1f}x" if vf else "")
            ax.text(i, values[i], label, ha="center", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.85})
        if "floor" in per:
            ax.axhline(per["floor"]["gbps"], color=COLORS["floor"], ls="--", lw=1.5)
        top = max(values + [per.get("floor", {}).get("gbps", 0)]) if values else 1
        ax.set_ylim(0, top * 1.25)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=9)
        floor = f", floor (dashed) {per['floor']['gbps']:.2f} GB/s" if "floor" in per else ""
        ax.set_title(f"world {world} (tp {_tp(r, world)}){floor}", fontsize=9)
        ax.set_ylabel("GB/s (needed bytes / time)")
    not_run = "; ".join(f"{k}: {v.removeprefix('not run: ')}" for k, v in r.get("not_run", {}).items())
    runs = sorted({s["runs"] for per in r["summary"].values() for s in per.values()})
    fig.suptitle(title(r) + (f"\nnot run: {not_run}" if not_run else ""), fontsize=9)
    fig.text(0.5, 0.01, f"bars: median GB/s over {'-'.join(map(str, [runs[0], runs[-1]][:len(set(runs))]))} runs; "
             "labels: GB/s and time / floor's time", ha="center", fontsize=8, color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tp(r: dict, world: str) -> str:
    run = next((x for x in r["runs"] if str(x["world"]) == world), None)
    return f"{run['tp']} x dp {run['dp']}" if run and run.get("dp", 1) > 1 else str(run["tp"] if run else "?")


def lines(results: list[dict], path: str) -> bool:
    """GB/s against world size for one setting; False when it has a single world size."""
    import matplotlib.pyplot as plt
    per_loader: dict[str, dict[int, float]] = {}
    for r in results:
        for world, per in r["summary"].items():
            for name, s in per.items():
                per_loader.setdefault(name, {})[int(world)] = s["gbps"]
    worlds = sorted({w for v in per_loader.values() for w in v})
    if len(worlds) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, points in per_loader.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name, color=COLORS.get(name),
                ls="--" if name in ("floor", "floor_fresh", "h2d") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("GB/s (needed bytes / time, median)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title(results[0]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="load_bench.py JSON files")
    parser.add_argument("--outdir", default=None, help="default: a plots/ folder beside the first file")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    results = load_results(args.results)
    outdir = args.outdir or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), "plots")
    os.makedirs(outdir, exist_ok=True)
    made = []
    for r in results:
        path = os.path.join(outdir, os.path.basename(r["_path"]).removesuffix(".json") + "_bars.png")
        bars(r, path)
        made.append(path)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(setting(r), []).append(r)
    for key, group in groups.items():
        _, device, preset, layout, mode = key
        path = os.path.join(outdir, f"load_{device}_{preset}_{layout}_{mode}_by_world.png")
        if lines(group, path):
            made.append(path)
    print("\n".join(made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
