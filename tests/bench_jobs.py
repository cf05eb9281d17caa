"""Per-rank job functions for the benchmarks and the bytes-per-rank test (importable by the
RankPool workers), plus the synthetic inputs they share."""

from __future__ import annotations

import time
from typing import Mapping

import torch

import distload
from distload import tracking
from distload.checkpoint.header import TensorInfo
from distload.comm import Comm, world_from_env
from distload.layout import Layout
from distload.plan import Plan, Unit, plan
from distload.spec import ParamSpec, Shard, Source

MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def moe_plan(num_units: int, world_size: int, tp: int, *, num_experts: int = 128) -> Plan:
    """A plan of exactly ``num_units`` units: MoE expert matrices, each cut into ``tp`` shards.

    Tensors are the first ``num_units / tp`` (layer, expert, projection) triples of a
    ``num_experts``-expert model; shapes are tiny (only the unit table matters here).
    """
    if num_units % tp:
        raise ValueError(f"num_units={num_units} must be a multiple of tp={tp}")
    rows, cols = 4 * tp, 16
    specs, infos, offset = [], {}, 0
    for k in range(num_units // tp):
        layer, rest = divmod(k, num_experts * len(MOE_PROJECTIONS))
        expert, proj = divmod(rest, len(MOE_PROJECTIONS))
        name = f"model.layers.{layer}.mlp.experts.{expert}.{MOE_PROJECTIONS[proj]}.weight"
        shard = Shard(dim=1 if MOE_PROJECTIONS[proj] == "down_proj" else 0, num_shards=tp)
        local = (rows, cols // tp) if shard.dim == 1 else (rows // tp, cols)
        specs.append(ParamSpec(name=name, shape=local, sources=(Source(name=name, shape=(rows, cols), shard=shard),)))
        nbytes = rows * cols * 2
        infos[name] = TensorInfo(name=name, file="/synthetic/experts.safetensors", dtype=torch.bfloat16,
                                 shape=(rows, cols), begin=offset, end=offset + nbytes)
        offset += nbytes
    return plan(infos, specs, Layout.for_world(world_size, tp=tp))


def unit_label(unit: Unit) -> str:
    """The string a name-based tracker would keep for a unit."""
    return f"{unit.name}#shard{unit.index}"


def merge_job(num_units: int, tp: int, reps: int) -> dict | None:
    """Times the distload merge against an all_gather_object of name sets, on this rank.

    Returns (rank 0 only), per repetition and mechanism, the seconds from the last rank's
    entry to the last rank's exit, and the slowest rank's own seconds.
    """
    world = world_from_env()
    # one intra-op thread per rank, as torchrun sets OMP_NUM_THREADS=1: with 8 ranks on a
    # few cores, idle OpenMP threads spinning after each op would otherwise steal the CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comm = Comm.connect(world, device=torch.device("cpu"))
    # as in load(): collectives meet in the rendezvous store first, watching for failed ranks
    comm.start_watch(dead_after=30.0)
    try:
        p = moe_plan(num_units, world.world_size, tp)
        loaded = [r.unit for r in p.for_rank(world.rank).reads]
        mine = {unit_label(p.units[u]) for u in loaded}
        universe = {unit_label(u) for u in p.units}

        def distload_merge(units: list[int]) -> tuple[int, ...]:
            totals = comm.sum_counts(tracking.record(p, units, dtype=tracking.count_dtype(world.world_size)))
            return tracking.classify(p, totals).failed

        def baseline_merge(names: set[str]) -> set[str]:
            return universe - set().union(*comm.gather_objects(names))

        # both mechanisms must agree on what is missing when rank 0 drops its first unit
        dropped = loaded[0] if world.rank == 0 else None
        dropped = comm.gather_objects(dropped)[0]
        keep = [u for u in loaded if u != dropped or world.rank != 0]
        assert distload_merge(keep) == (dropped,)
        found = baseline_merge({unit_label(p.units[u]) for u in keep})
        # with other owners (dp > 1) a name set cannot see that one owner lacks the unit
        assert found == ({unit_label(p.units[dropped])} if p.num_owners(dropped) == 1 else set())

        def floor() -> None:  # the latency of any one collective: an all_reduce of 8 ints
            comm.sum_counts(torch.zeros(8, dtype=torch.int32))

        steps = (lambda: distload_merge(loaded) == (), lambda: baseline_merge(mine) == set(), floor)
        clock = time.CLOCK_MONOTONIC  # one clock for every process of the machine
        stamps = []  # per repetition and step: (start, end) on this rank
        for rep in range(reps + 1):  # repetition 0 warms up and is dropped
            row = [(0.0, 0.0)] * len(steps)
            order = range(len(steps)) if rep % 2 else reversed(range(len(steps)))  # alternate the order
            for which in order:
                comm.barrier()
                start = time.clock_gettime(clock)
                ok = steps[which]()
                row[which] = (start, time.clock_gettime(clock))
                assert ok is not False
            if rep:
                stamps.extend(row)
        # [world, reps, steps, 2]
        every = comm.gather_rows(torch.tensor(stamps, dtype=torch.float64).flatten()).view(
            world.world_size, reps, len(steps), 2)
        if world.rank != 0:
            return None
        # a collective cannot end before its last rank enters it: time it from then to the last exit
        last_in_to_last_out = every[..., 1].max(0).values - every[..., 0].max(0).values
        slowest_rank = (every[..., 1] - every[..., 0]).max(0).values
        names = ("distload", "baseline", "floor")
        return {**{f"{n}_s": last_in_to_last_out[:, i].tolist() for i, n in enumerate(names)},
                **{f"{n}_slowest_rank_s": slowest_rank[:, i].tolist() for i, n in enumerate(names)},
                "units_per_rank": len(loaded), "num_units": len(p.units)}
    finally:
        comm.close()
        torch.set_num_threads(threads)


def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return None


def load_bytes_job(directory: str, tp: int) -> dict:
    """Loads on this rank; returns the report JSON and the process's rchar delta (bytes read
    through read()/pread() by any thread, headers and sockets included: a cross-check only)."""
    before = _rchar()
    loaded = distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"))
    after = _rchar()
    return {"report": loaded.report.to_json(),
            "rchar": after - before if before is not None and after is not None else None}


def byte_shares(shapes: Mapping[str, tuple[int, ...]], cfg: Mapping, tp: int, itemsize: int) -> dict[str, int]:
    """What each TP rank of a Llama checkpoint must read, from the checkpoint's shapes alone.

    Norms are replicated (whole tensor on every rank); k/v are cut into min(tp, kv heads)
    pieces (replicated beyond that); everything else into ``tp`` pieces.
    """
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    sharded = replicated = 0
    share = 0.0
    for name, shape in shapes.items():
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if name.endswith("norm.weight"):
            replicated += nbytes
            share += nbytes
        else:
            sharded += nbytes
            pieces = min(tp, kv) if name.endswith(("k_proj.weight", "v_proj.weight")) else tp
            share += nbytes / pieces
    return {"sharded_bytes": sharded, "replicated_bytes": replicated, "share_bytes": int(share)}
