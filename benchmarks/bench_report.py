"""Numbers and text of a load_bench.py result: per-run summaries, medians, the machine, the table.

``summarize_run`` turns the ranks' results of one measured load into its numbers (time,
GB/s, I/O, CPU, memory, checks); ``summarize`` takes medians per world size and loader and
each loader's time over the floor's; ``DEFINITIONS`` (written into every result) says what
each number means; ``machine_info`` records where it ran; ``print_table`` prints the summary.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFINITIONS = {
    "seconds": "max over ranks of t1 - max over ranks of t0 (CLOCK_MONOTONIC): from the last rank leaving the "
               "barrier to the slowest rank holding filled parameters; process start, imports, process-group "
               "creation and the loader's untimed setup (floor/h2d buffers, peer imports) are outside it; model "
               "build and allocation on the device are inside it for every loader but floor and h2d",
    "needed_bytes": "sum over ranks of the checkpoint bytes that rank's parameters need (distload's plan; each "
                    "DP replica counts)",
    "gbps": "needed_bytes / seconds / 1e9",
    "gbps_per_rank": "gbps / world: per GPU on CUDA (one rank per GPU)",
    "unique_bytes": "distinct checkpoint bytes the job needs (each byte once, whatever the replicas)",
    "gbps_unique": "unique_bytes / seconds / 1e9",
    "vs_floor": "median seconds / the floor's median seconds at the same world size, same invocation",
    "read_bytes_node": "sum over ranks of /proc/self/io read_bytes deltas over the interval (bytes fetched from "
                       "storage on behalf of the process; 0 when served by the page cache)",
    "rchar_node": "sum over ranks of /proc/self/io rchar deltas (bytes returned by read-like system calls, gloo "
                  "sockets included; mmap page faults are not counted)",
    "cpu_seconds": "user + sys CPU seconds over the interval, summed over ranks",
    "peak_rss_bytes": "per rank: peak resident set over the interval (VmHWM after clear_refs), max over ranks",
    "merge_seconds": "distload's tracking merge: the least of its ranks' merge_seconds (the last rank to arrive "
                     "waits for no other)",
    "allreduce8_seconds": "median over 5 of an all_reduce of 8 integers on the same group after the load, slowest "
                          "rank: the latency any collective pays",
    "rss_growth_per_rank": "peak RSS over the interval minus RSS before it, max over ranks",
    "vs_floor_fresh": "median seconds / floor_fresh's (the floor reading into freshly allocated memory)",
    "bytes_hashed": "distload_verify: bytes all ranks hashed (each file read whole once more per node)",
    "staging_bytes": "per rank, host memory held in intermediate buffers (pinned on CUDA) where the loader "
                     "reports it (distload's report, the floor's buffer, eager's largest file), else null",
}


def summarize_run(ranks: list[dict], needed: int, unique: int) -> dict:
    """One run's numbers from its ranks' results."""
    seconds = max(r["t1"] for r in ranks) - max(r["t0"] for r in ranks)
    stats0 = ranks[0]["stats"]
    out = {
        "seconds": round(seconds, 4), "slowest_rank_seconds": round(max(r["seconds"] for r in ranks), 4),
        "gbps": round(needed / seconds / 1e9, 3), "gbps_unique": round(unique / seconds / 1e9, 3),
        "gbps_per_rank": round(needed / seconds / 1e9 / len(ranks), 3),
        "planned_bytes_per_rank": [r.get("planned_bytes") for r in ranks],
        "read_bytes_node": _sum(r.get("read_bytes") for r in ranks),
        "rchar_node": _sum(r.get("rchar") for r in ranks),
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in ranks), 3),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "peak_rss_per_rank": [r["peak_rss_bytes"] for r in ranks],
        "staging_bytes_per_rank": [r["stats"].get("staging_bytes") for r in ranks],
        "process_seconds": {k: max(r["phases"].get(k, 0) for r in ranks) for k in ranks[0].get("phases", {})},
        "check_ok": all(r["check"]["ok"] for r in ranks),
        "check": [r["check"] for r in ranks if not r["check"]["ok"]][:2],
    }
    for key in ("pinned_peak_bytes", "device_peak_bytes"):
        if key in ranks[0]:
            out[key + "_per_rank"] = [r.get(key) for r in ranks]
    deltas = [r["peak_rss_bytes"] - r["rss_before_bytes"] for r in ranks if r.get("rss_before_bytes") is not None]
    out["rss_growth_per_rank"] = max(deltas) if deltas else None
    out["allreduce8_seconds"] = max((r.get("allreduce8_seconds") or 0.0) for r in ranks) or None
    report_ranks = (stats0.get("report") or {}).get("ranks") or []
    if report_ranks:  # the last rank to arrive waits for nobody: its merge time is the merge's own
        out["merge_seconds"] = min(r.get("merge_seconds", 0.0) for r in report_ranks)
    for key in ("merge_seconds", "complete", "buffer_bytes", "odirect", "backend", "threads", "bytes_hashed"):
        if key in out:
            continue
        if stats0.get(key) is not None:
            out[key] = stats0[key]
    if stats0.get("report") is not None:
        out["distload_report"] = {k: v for k, v in stats0["report"].items()
                                  if k in ("complete", "seconds", "merge_seconds", "bytes_read", "ranks", "notes")}
    return out


def _sum(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def summarize(runs: list[dict], loaders: list[str]) -> dict:
    """Medians per (world, loader) and each loader's time over the floor's."""
    out: dict = {}
    for world in sorted({r["world"] for r in runs}):
        per: dict = {}
        for name in loaders:
            ok = [r for r in runs if r["world"] == world and r["loader"] == name and r.get("seconds") is not None]
            if not ok:
                continue
            med = statistics.median(r["seconds"] for r in ok)
            per[name] = {"runs": len(ok), "seconds": round(med, 4),
                         "gbps": round(statistics.median(r["gbps"] for r in ok), 3),
                         "gbps_unique": round(statistics.median(r["gbps_unique"] for r in ok), 3),
                         "gbps_per_rank": round(statistics.median(r["gbps"] / world for r in ok), 3),
                         "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in ok), 3),
                         "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in ok)),
                         "read_bytes_node": _median([r["read_bytes_node"] for r in ok]),
                         "rchar_node": _median([r["rchar_node"] for r in ok]),
                         "merge_seconds": _median([r.get("merge_seconds") for r in ok]),
                         "bytes_hashed": _median([r.get("bytes_hashed") for r in ok]),
                         "allreduce8_seconds": _median([r.get("allreduce8_seconds") for r in ok]),
                         "rss_growth_per_rank": _median([r.get("rss_growth_per_rank") for r in ok]),
                         "staging_bytes_per_rank": max((max((b or 0) for b in r["staging_bytes_per_rank"])
                                                        for r in ok), default=None),
                         "all_checks_ok": all(r["check_ok"] for r in ok),
                         "min_seconds": min(r["seconds"] for r in ok), "max_seconds": max(r["seconds"] for r in ok)}
        floor = per.get("floor", {}).get("seconds")
        fresh = per.get("floor_fresh", {}).get("seconds")
        for name, s in per.items():
            s["vs_floor_fresh"] = round(s["seconds"] / fresh, 3) if fresh else None
        for name, s in per.items():
            s["vs_floor"] = round(s["seconds"] / floor, 3) if floor else None
        out[str(world)] = per
    return out


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine_info(device: str) -> dict:
    info = {"hostname": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "cores": len(os.sched_getaffinity(0)), "cpu": _cpu_model(), "mem_total_bytes": _meminfo("MemTotal")}
    import importlib.metadata as md
    for pkg in ("torch", "safetensors", "fastsafetensors", "instanttensor"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if device == "cuda":
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info["distload_revision"] = _revision()
    info["distload_sources_sha256"] = _sources_hash()
    return info


def _sources_hash() -> str:
    """A digest of distload/**/*.py as they are now (where the checkout's git is absent or stale)."""
    import hashlib
    digest = hashlib.sha256()
    for folder, dirs, names in sorted(os.walk(os.path.join(ROOT, "distload"))):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _revision() -> str | None:
    """The checkout's commit, with "+changes" when distload/ differs from it (read-only git calls)."""
    try:
        git = ["git", "--no-optional-locks", "-C", ROOT]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "distload"], capture_output=True, text=True,
                               timeout=10)
        if head.returncode:
            return None
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def print_table(result: dict) -> None:
    m = result["machine"]
    ckpt = result["checkpoint"]
    print(f"\n{result['preset']} ({ckpt['bytes'] / 1e9:.2f} GB, {ckpt['files']} files), {result['device']}, "
          f"layout {result['layout']}, {result['mode']}; {m['cores']} cores, {m.get('gpu') or m['cpu']}")
    print(f"{'world':>5} {'loader':>15} {'runs':>4} {'median s':>9} {'GB/s':>7} {'/rank':>6} {'x floor':>8} "
          f"{'CPU s':>7} {'RSS MiB':>8} {'+RSS MiB':>8} {'read GB':>8} {'rchar GB':>8} {'merge s':>8} {'ar8 s':>7}")
    for world, per in result["summary"].items():
        for name, s in per.items():
            rb = f"{s['read_bytes_node'] / 1e9:8.2f}" if s["read_bytes_node"] is not None else f"{'-':>8}"
            rb += f" {s['rchar_node'] / 1e9:8.2f}" if s["rchar_node"] is not None else f" {'-':>8}"
            ms = f"{s['merge_seconds']:8.4f}" if s["merge_seconds"] is not None else f"{'-':>8}"
            vf = f"{s['vs_floor']:8.2f}" if s["vs_floor"] is not None else f"{'-':>8}"
            grow = s.get("rss_growth_per_rank")
            gr = f"{grow / 2**20:8.0f}" if grow is not None else f"{'-':>8}"
            ar = s.get("allreduce8_seconds")
            ar8 = f"{ar:7.4f}" if ar is not None else f"{'-':>7}"
            print(f"{world:>5} {name:>15} {s['runs']:>4} {s['seconds']:9.3f} {s['gbps']:7.2f} "
                  f"{s['gbps_per_rank']:6.2f} {vf} {s['cpu_seconds']:7.2f} {s['peak_rss_bytes'] / 2**20:8.0f} "
                  f"{gr} {rb} {ms} {ar8}")
    failed = [r for r in result["runs"] if r.get("error")]
    for name, why in result["not_run"].items():
        print(f"{name}: {why}")
    for r in failed[:6]:
        print(f"world {r['world']} {r['loader']} run {r['run']}: {r['error'].splitlines()[0][:200]}")
