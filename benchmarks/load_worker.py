"""One rank of one measured load (started by load_bench.py, one fresh process per rank).

Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), imports everything, creates the process group (gloo on CPU, NCCL on CUDA),
runs the loader's untimed setup, meets the other ranks at a barrier, then:
t0 = CLOCK_MONOTONIC, the loader's run, device synchronize, t1. Around that interval it
takes this process's CPU time (user + sys, all threads), ``/proc/self/io`` (``read_bytes``:
bytes this process caused to be fetched from storage; ``rchar``: bytes returned by read-like
calls, sockets included) and its peak RSS (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; ``ru_maxrss`` where that fails), and, on CUDA, peak pinned host
memory (torch's host allocator) and device memory. Afterwards, untimed, the loader checks what
it filled against the checkpoint. Writes one JSON object to ``--result``.

    python -m benchmarks.load_worker --dir CKPT --loader engine --tp 2 --dp 1 --device cpu --result r0.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
import traceback

import torch
import torch.distributed as dist

import distload  # noqa: F401  (imported before the timed interval, as every loader's modules)
import safetensors.torch  # noqa: F401

from .bench_ctx import Ctx, cores
from .loaders import LOADERS

PHASES: dict[str, float] = {"imported": time.clock_gettime(time.CLOCK_MONOTONIC)}
"""CLOCK_MONOTONIC when each untimed phase ended (the runner subtracts its spawn time)"""


def _phase(name: str) -> None:
    PHASES[name] = time.clock_gettime(time.CLOCK_MONOTONIC)


def read_io() -> dict[str, int]:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines() if ": " in line)}
    except OSError:
        return {}


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cuda_memory(device: torch.device, reset: bool) -> dict:
    """Peak device memory and pinned host memory (torch's allocators only); resets them first."""
    if device.type != "cuda":
        return {}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
        return {}
    out = {"device_peak_bytes": torch.cuda.max_memory_allocated(device)}
    if host is not None:
        try:
            stats = host()
            out["pinned_peak_bytes"] = stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak"))
        except RuntimeError:
            pass
    return out


def allreduce8(ctx: Ctx, reps: int = 5) -> float:
    """Median time of an all_reduce of 8 integers on this group: the latency any collective pays,
    the yardstick for the tracking merge."""
    x = torch.zeros(8, dtype=torch.int32, device=ctx.device)
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        ctx.sync()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[reps // 2]


def make_ctx(args: argparse.Namespace) -> Ctx:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local, local_world = int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # the CUDA context, before the timed interval
    return Ctx(directory=args.dir, rank=rank, world=world, local_rank=local, local_world=local_world,
               tp=args.tp, dp=args.dp, device=device, cold=args.cold, threads=max(1, cores() // local_world))


def init_group(ctx: Ctx) -> None:
    kwargs = {"timeout": datetime.timedelta(seconds=600)}
    if ctx.device.type == "cuda":
        kwargs["device_id"] = ctx.device
    dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", rank=ctx.rank,
                            world_size=ctx.world, **kwargs)


def measure(ctx: Ctx, name: str, check: int | None) -> dict:
    loader = LOADERS[name]
    _phase("group_ready")
    if loader.setup is not None:
        loader.setup(ctx)
    _phase("setup_done")
    cuda_memory(ctx.device, reset=True)
    rss_before = status_kib("VmRSS")
    peak_reset = reset_peak_rss()
    dist.barrier()
    io0, cpu0 = read_io(), cpu_seconds()
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    stats = loader.run(ctx)
    ctx.sync()
    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    cpu1, io1 = cpu_seconds(), read_io()
    peak = status_kib("VmHWM") if peak_reset else None
    out = {"rank": ctx.rank, "t0": t0, "t1": t1, "seconds": t1 - t0, "cpu_seconds": cpu1 - cpu0,
           "read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0) if io0 else None,
           "rchar": io1.get("rchar", 0) - io0.get("rchar", 0) if io0 else None,
           "peak_rss_bytes": peak * 1024 if peak is not None else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_rss_kind": "VmHWM over the interval" if peak is not None else "ru_maxrss (process lifetime)",
           "rss_before_bytes": rss_before * 1024 if rss_before is not None else None,
           "threads": ctx.threads, **cuda_memory(ctx.device, reset=False), "stats": stats}
    out["check"] = loader.verify(ctx, check)
    _phase("verified")
    out["allreduce8_seconds"] = allreduce8(ctx)
    out["phases"] = dict(PHASES)
    if ctx.rank_plan is not None:
        out["planned_bytes"] = sum(r.nbytes for r in ctx.reads())
    return out


def pool_job(directory: str, loader: str, tp: int, dp: int, check: int | None) -> dict:
    """``measure`` on one rank of a ``distload.testing.RankPool`` job (tests: the same code without a
    process start per load)."""
    ctx = make_ctx(argparse.Namespace(dir=directory, device="cpu", tp=tp, dp=dp, cold=False))
    init_group(ctx)
    return measure(ctx, loader, check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--loader", required=True, choices=sorted(LOADERS))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cold", action="store_true", help="peers use their direct-I/O back-ends")
    parser.add_argument("--check", type=int, default=3, help="slices compared with the checkpoint (0: all)")
    parser.add_argument("--result", required=True, help="write this rank's JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else torch.get_num_threads())
    ctx = make_ctx(args)
    code = 0
    try:
        init_group(ctx)
        out = measure(ctx, args.loader, args.check or None)
    except BaseException as err:  # recorded; the runner decides
        out = {"rank": ctx.rank, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        code = 1
    with open(args.result + ".tmp", "w") as f:
        json.dump(out, f, default=str)
    os.replace(args.result + ".tmp", args.result)
    if code == 0 and dist.is_initialized():
        dist.barrier()  # nobody leaves while a peer still verifies through the group
    sys.stdout.flush()
    os._exit(code)  # no group teardown or interpreter exit (thread pools, CUDA, NCCL): the result is written


if __name__ == "__main__":
    sys.exit(main())
