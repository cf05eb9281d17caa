"""Per-rank job functions for the benchmarks and the bytes-per-rank test (importable by the
RankPool workers), plus the synthetic inputs they share."""

from __future__ import annotations

import time
from typing import Callable, Mapping

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


def track_inputs(keys_per_rank: int, rank: int, world_size: int):
    """One rank's inputs to a ``distload.track`` merge of ``keys_per_rank`` keys: piece ``rank`` of
    ``world_size`` of every one of ``keys_per_rank`` expert matrices (as under TP = world), all
    marked loaded, and the checkpoint headers naming those matrices."""
    from distload.checkpoint.directory import Checkpoint
    from distload.track import Expectations, Key, Recorder

    names = [f"model.layers.{i // 3072}.mlp.experts.{i // 3 % 1024}.{MOE_PROJECTIONS[i % 3]}.weight"
             for i in range(keys_per_rank)]
    exp = Expectations()
    for name in names:
        exp.expect(Key.of(name, dim=0, index=rank, num_shards=world_size), param=name)
    rec = Recorder(exp, {})
    for e in exp.entries():
        rec.mark(e.key)
    rows, cols = 4 * world_size, 16
    tensors = {n: TensorInfo(name=n, file="/synthetic/experts.safetensors", dtype=torch.bfloat16, shape=(rows, cols),
                             begin=i * rows * cols * 2, end=(i + 1) * rows * cols * 2) for i, n in enumerate(names)}
    return exp, rec, Checkpoint(directory="/synthetic", config={}, tensors=tensors, files=(), sizes={})


def _rss_mib() -> float:
    """This process's peak resident set, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _handed(group, merge: Callable[[], object]) -> dict[str, int]:
    """The bytes this rank hands to each collective of one ``merge`` over ``group``, measured: its
    all-gathers in order (the agreement, the keys, its part of the table), then its sum."""
    gathered, summed = [], []
    gather_rows, total = group.gather_rows, group.sum
    group.gather_rows = lambda row: gathered.append(row.numel() * row.element_size()) or gather_rows(row)
    group.sum = lambda counts: summed.append(counts.numel() * counts.element_size()) or total(counts)
    try:
        merge()
    finally:
        del group.gather_rows, group.sum
    agree, keys, parts = gathered
    (flags,) = summed
    return {"track_agree": agree, "track_keys": keys, "track_parts": parts, "track_flags": flags}


def track_merge_job(keys_per_rank: int, reps: int) -> dict | None:
    """Times ``distload.track.merge`` (agreement, key all-gather, flag all-reduce, classification,
    hashing and fingerprinting included) against an ``all_gather_object`` of each rank's expected and
    loaded name sets (missing = expected - loaded over their unions), on this rank.

    Returns (rank 0 only) per repetition and mechanism the seconds from the last rank's entry to the
    last rank's exit; the slowest rank's first merge, which also digests the checkpoint and places the
    expected names in it (once per opened checkpoint: later merges reuse both); each rank's bytes
    handed to the collectives, and each rank's peak RSS."""
    import pickle

    from distload.comm import GroupComm
    from distload.track.merge import merge_with

    world = world_from_env()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comm = Comm.connect(world, device=torch.device("cpu"))
    try:
        start_rss = _rss_mib()
        group = GroupComm()
        exp, rec, ckpt = track_inputs(keys_per_rank, world.rank, world.world_size)
        labels = {f"{e.key.name}#{e.key.index}" for e in exp.entries()}
        inputs_rss = _rss_mib()

        def tracked(expected, recorder) -> tuple[str, ...]:
            report = merge_with(group, expected, recorder, checkpoint=ckpt)
            return tuple(e.name for e in (*report.findings.missing, *report.findings.inconsistent))

        def baseline(expected: set[str], loaded: set[str]) -> set[str]:
            sets = comm.gather_objects((expected, loaded))
            return set().union(*(e for e, _ in sets)) - set().union(*(l for _, l in sets))

        # both must find the one piece rank 0 does not load (its owner is rank 0 alone: the name is
        # inconsistent, its other pieces loaded)
        dropped = exp.entries()[0].key if world.rank == 0 else None
        lossy = rec
        if dropped is not None:
            from distload.track import Recorder
            lossy = Recorder(exp, {})
            for e in exp.entries()[1:]:
                lossy.mark(e.key)
        name = comm.gather_objects(dropped.name if dropped else None)[0]
        comm.barrier()
        first = time.perf_counter()
        assert tracked(exp, lossy) == (name,)  # the first merge also digests the checkpoint, once
        first = time.perf_counter() - first
        track_rss = _rss_mib()  # before the baseline ever ran here
        assert baseline(labels, labels - ({f"{dropped.name}#0"} if dropped else set())) == {f"{name}#0"}

        steps = (lambda: tracked(exp, rec) == (), lambda: baseline(labels, labels) == set())
        clock = time.CLOCK_MONOTONIC
        stamps = []
        for rep in range(reps + 1):  # repetition 0 warms up and is dropped
            row = [(0.0, 0.0)] * len(steps)
            for which in (range(len(steps)) if rep % 2 else reversed(range(len(steps)))):
                comm.barrier()
                t0 = time.clock_gettime(clock)
                ok = steps[which]()
                row[which] = (t0, time.clock_gettime(clock))
                assert ok
            if rep:
                stamps.extend(row)
        sent = {**_handed(group, lambda: tracked(exp, rec)), "baseline": len(pickle.dumps((labels, labels)))}
        every = comm.gather_rows(torch.tensor([*(x for pair in stamps for x in pair), first, start_rss, inputs_rss,
                                               track_rss, _rss_mib()], dtype=torch.float64))
        if world.rank != 0:
            return None
        times = every[:, :-5].view(world.world_size, reps, len(steps), 2)
        last_in_to_last_out = times[..., 1].max(0).values - times[..., 0].max(0).values
        units = keys_per_rank * world.world_size
        return {"track_s": last_in_to_last_out[:, 0].tolist(), "baseline_s": last_in_to_last_out[:, 1].tolist(),
                "first_track_s": float(every[:, -5].max()), "bytes_handed_per_rank": sent, "num_units": units,
                "rss_mib": {"start": every[:, -4].tolist(), "inputs": every[:, -3].tolist(),
                            "after_track": every[:, -2].tolist(), "peak": every[:, -1].tolist()}}
    finally:
        comm.close()
        torch.set_num_threads(threads)
