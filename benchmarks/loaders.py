"""The loaders the load benchmark compares, each filling one rank's parameters from a checkpoint.

Every loader is a ``Loader``: ``run(ctx) -> stats`` is the timed part, on ONE rank of a job
whose process group exists; ``setup(ctx)``, when there is one, runs before the barrier and is
not timed (imports, buffers); ``verify(ctx)`` checks afterwards that the right bytes landed.
Peers fill the parameters distload plans (``Ctx.prepare``: the model built on the meta
device, allocated on the device, inside the timed part as distload's own load does it):

- ``distload``: ``distload.load`` (it reuses the existing process group).
- ``distload_verify``: the same with ``verify_checksums=True`` against the checkpoint's manifest.
- ``distload_no_readahead``: the same with the loader extra-config ``readahead`` false (cold
  files are not asked for ahead of the readers): what the readahead adds, measured side by side.
- ``distload_no_huge_pages``: the same with ``huge_pages`` false (CPU parameters on 4 KiB pages).
- ``eager``: ``safetensors.torch.load_file`` of every file the rank needs (on the CPU), every
  needed tensor read whole (cloned: safetensors >= 0.7 maps files lazily, so without it only
  the pages the copy touches would be read), then narrowed and copied into the parameters.
- ``load_file``: ``load_file(file, device=...)`` of those files, narrowed and copied as they come
  (on a CPU the mapping is lazy; on CUDA every tensor of the file is moved to the device whole).
- ``engine``: the serving-engine pattern: ``safe_open``, ``get_slice`` narrowed on the sharded
  dim (``get_tensor`` for whole tensors), ``.to(device)``, copy.
- ``fastsafetensors``: ``SafeTensorsFileLoader(pg, device, nogds=True)``, files given round
  robin to the TP group's ranks (``add_filenames``), ``copy_files_to_device``, then
  ``get_sharded`` / ``get_tensor`` per tensor; buffered reads warm (``FASTSAFETENSORS_ODIRECT=0``),
  its default O_DIRECT cold.
- ``instanttensor``: ``safe_open(files, "pt", device, process_group=..., copy=False)`` and its
  ``tensors()`` stream; ``BackendPolicy.BUFFERED`` warm, its default (direct I/O) cold. CUDA only.
- ``floor``: parallel ``os.preadv`` of exactly this rank's byte ranges from a thread pool into
  one buffer allocated (pinned on CUDA) and touched before the timed part; nothing else.
- ``floor_fresh``: the floor reading into a buffer allocated inside the timed part, so its pages
  are faulted in (and zeroed by the kernel) by the reads, as every loader's parameters are.
- ``h2d`` (CUDA only): one pinned host-to-device copy of a buffer of the rank's planned bytes.

``unavailable(name, ctx)`` says why a loader cannot run in a setting (reported "not run").
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .bench_ctx import Ctx, piece_of, place, slices_of, verify_buffer, verify_params

CHUNK = 16 * 1024 * 1024
"""largest single pread of the floor (a big contiguous run is split so threads share it)"""


@dataclass(frozen=True)
class Loader:
    name: str
    run: Callable[[Ctx], dict]
    setup: Callable[[Ctx], None] | None = None
    verify: Callable[..., dict] = verify_params


# --- distload ---------------------------------------------------------------------------------

def run_distload(ctx: Ctx, **options) -> dict:
    import distload
    config = distload.LoadConfig(tp=ctx.tp, dp=ctx.dp, device=ctx.device.type, **options)
    loaded = distload.load(ctx.directory, config)
    ctx.model = loaded.model
    report = loaded.report.to_json()
    mine = next((r for r in report.get("ranks", []) if r.get("rank") == ctx.rank), {})
    return {"complete": report.get("complete"), "report_seconds": report.get("seconds"),
            "merge_seconds": report.get("merge_seconds", mine.get("merge_seconds")),
            "staging_bytes": mine.get("staging_bytes"), "bytes_read": mine.get("bytes_read"),
            "bytes_hashed": sum(r.get("bytes_hashed", 0) for r in report.get("ranks", [])),
            "report": report if ctx.rank == 0 else None}


def run_distload_verify(ctx: Ctx) -> dict:
    """distload with ``verify_checksums``: the checkpoint's manifest (load_bench runs ``python -m
    distload.manifest``, untimed) is the reference; every file is hashed whole once per node beside
    the reads."""
    out = run_distload(ctx, verify_checksums=True)
    if out["report"] is not None and not out["report"]["verification"]["ok"]:
        raise RuntimeError(f"verification failed: {out['report']['verification']}")
    return out


def run_distload_no_readahead(ctx: Ctx) -> dict:
    return run_distload(ctx, extra_config={"readahead": False})


def run_distload_no_huge_pages(ctx: Ctx) -> dict:
    return run_distload(ctx, extra_config={"huge_pages": False})


# --- safetensors ------------------------------------------------------------------------------

def _whole_files(ctx: Ctx, device: str, *, whole: bool) -> dict:
    from safetensors.torch import load_file
    ctx.prepare()
    largest = 0
    for path, reads in ctx.reads_by_file().items():
        tensors = load_file(path, device=device)
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors.values()))
        name, full = None, None
        for r in reads:  # a tensor's reads are adjacent
            if r.tensor.name != name:  # eager: the whole tensor in memory of its own before it is cut
                name = r.tensor.name
                full = tensors[name].clone() if whole else tensors[name]
            place(ctx.params, r, piece_of(full, r))
        del tensors, full
    ctx.sync()
    return {"staging_bytes": largest, "staging_note": "largest file's tensors"}


def run_eager(ctx: Ctx) -> dict:
    return _whole_files(ctx, "cpu", whole=True)


def run_load_file(ctx: Ctx) -> dict:
    return _whole_files(ctx, str(ctx.device), whole=False)


def run_engine(ctx: Ctx) -> dict:
    from safetensors import safe_open
    ctx.prepare()
    for path, reads in ctx.reads_by_file().items():
        with safe_open(path, framework="pt") as f:
            for r in reads:
                index = slices_of(r)
                t = f.get_tensor(r.tensor.name) if index is None else f.get_slice(r.tensor.name)[index]
                place(ctx.params, r, t.to(ctx.device))
    ctx.sync()
    return {"staging_bytes": None}


# --- fastsafetensors --------------------------------------------------------------------------

def setup_fastsafetensors(ctx: Ctx) -> None:
    os.environ["FASTSAFETENSORS_ODIRECT"] = "1" if ctx.cold else "0"
    import fastsafetensors  # noqa: F401  (imported before the timed part)
    ctx.state["pg"] = tp_group(ctx)


def run_fastsafetensors(ctx: Ctx) -> dict:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup, live_allocation_bytes
    ctx.prepare()
    pg = ctx.state.get("pg") or SingleGroup()
    size = 1 if isinstance(pg, SingleGroup) else pg.size()
    needs: dict[str, list] = {}
    for r in ctx.reads():
        needs.setdefault(r.tensor.name, []).append(r)
    files = sorted(ctx.reads_by_file())  # the same on every rank of a TP group
    loader = SafeTensorsFileLoader(pg, str(ctx.device), nogds=True, max_threads=max(1, ctx.threads))
    peak = 0
    try:
        for start in range(0, len(files), size):  # one file per rank at a time, as vLLM batches them
            loader.add_filenames({i: [f] for i, f in enumerate(files[start:start + size])})
            fb = loader.copy_files_to_device()
            peak = max(peak, live_allocation_bytes())
            for name in sorted(fb.key_to_rank_lidx):
                _fst_place(ctx, fb, name, needs.get(name, ()), size)
            fb.close()
            loader.reset()
    finally:
        loader.close()
    ctx.sync()
    return {"staging_bytes": None, "buffer_bytes": peak, "odirect": os.environ.get("FASTSAFETENSORS_ODIRECT")}


def _fst_place(ctx: Ctx, fb, name: str, reads, size: int) -> None:
    """One tensor: every rank of the group makes the same call (they are collectives)."""
    if not reads:
        return
    dim = reads[0].dim
    if dim is None or size == 1:
        full = fb.get_tensor(name)
        for r in reads:
            place(ctx.params, r, piece_of(full, r))
        return
    piece = fb.get_sharded(name, dim)  # this rank's 1/size of the tensor along dim
    for r in reads:
        place(ctx.params, r, piece)


def tp_group(ctx: Ctx):
    """This rank's TP group as a process group (``new_group`` is called for every group, in the
    same order on every rank); the world group when TP spans the world; None at TP 1."""
    import torch.distributed as dist
    if ctx.tp == 1:
        return None
    if ctx.tp == ctx.world:
        return dist.group.WORLD
    mine = None
    for ranks in ctx.layout().tp_groups():
        group = dist.new_group(list(ranks))
        if ctx.rank in ranks:
            mine = group
    return mine


# --- instanttensor ----------------------------------------------------------------------------

def setup_instanttensor(ctx: Ctx) -> None:
    import instanttensor  # noqa: F401
    ctx.state["pg"] = tp_group(ctx)


def run_instanttensor(ctx: Ctx) -> dict:
    from instanttensor import BackendPolicy, safe_open
    ctx.prepare()
    needs: dict[str, list] = {}
    for r in ctx.reads():
        needs.setdefault(r.tensor.name, []).append(r)
    files = sorted(ctx.reads_by_file())
    backend = None if ctx.cold else BackendPolicy.BUFFERED
    with safe_open(files, framework="pt", device=ctx.device.index or 0, process_group=ctx.state.get("pg"),
                   copy=False, backend=backend) as f:
        buffer = getattr(f, "buffer_size", None)
        for name, tensor in f.tensors():  # zero-copy views: consumed before the next one
            for r in needs.get(name, ()):
                place(ctx.params, r, piece_of(tensor, r))
    ctx.sync()
    return {"staging_bytes": None, "buffer_bytes": buffer, "backend": "default" if ctx.cold else "BUFFERED"}


# --- floor and h2d ----------------------------------------------------------------------------

def setup_floor(ctx: Ctx, fresh: bool = False) -> None:
    """Plans the byte ranges, opens the files, allocates and touches the one buffer (with ``fresh``,
    leaves the buffer to the timed part)."""
    ctx.plan_only()
    spans, tasks, cursor = [], [], 0
    fds = {path: os.open(path, os.O_RDONLY) for path in ctx.reads_by_file()}
    for r in ctx.reads():
        spans.append((r, cursor))
        if r.count == 1:  # one contiguous run, split into CHUNK pieces
            for off in range(0, r.run, CHUNK):
                tasks.append((fds[r.tensor.file], [(r.offset + off, cursor + off, min(CHUNK, r.run - off))]))
        else:  # a column shard: one pread per row, one task per read
            tasks.append((fds[r.tensor.file], [(r.offset + i * r.stride, cursor + i * r.run, r.run)
                                               for i in range(r.count)]))
        cursor += r.nbytes
    ctx.state.update(spans=spans, tasks=tasks, fds=fds, size=cursor, pool=ThreadPoolExecutor(max(1, ctx.threads)))
    if not fresh:
        _floor_buffer(ctx)
        ctx.state["buffer"].fill_(0)  # fault the pages in: the floor times reading, not page faults


def setup_floor_fresh(ctx: Ctx) -> None:
    """The floor's plan and files; its buffer is allocated inside the timed part (``floor_fresh``)."""
    setup_floor(ctx, fresh=True)


def _floor_buffer(ctx: Ctx) -> None:
    n = ctx.state["size"]
    buffer = torch.empty(n, dtype=torch.uint8, pin_memory=ctx.device.type == "cuda")
    ctx.state.update(buffer=buffer, view=memoryview(buffer.numpy()) if n else memoryview(b""))


def _pread_task(view: memoryview, task) -> int:
    fd, runs = task
    done = 0
    for offset, where, length in runs:
        got = 0
        while got < length:
            n = os.preadv(fd, [view[where + got:where + length]], offset + got)
            if n <= 0:
                raise OSError(f"short read at {offset + got}")
            got += n
        done += length
    return done


def run_floor(ctx: Ctx) -> dict:
    s = ctx.state
    if "buffer" not in s:  # floor_fresh: fresh memory, faulted in by the reads, as every loader's is
        _floor_buffer(ctx)
    done = sum(s["pool"].map(lambda t: _pread_task(s["view"], t), s["tasks"]))
    return {"bytes_read": done, "staging_bytes": s["buffer"].numel(), "pinned": ctx.device.type == "cuda",
            "threads": max(1, ctx.threads)}


def verify_floor(ctx: Ctx, limit: int | None = 3) -> dict:
    s = ctx.state
    out = verify_buffer(ctx, s["buffer"], s["spans"], limit)
    s["pool"].shutdown()
    for fd in s["fds"].values():
        os.close(fd)
    return out


def setup_h2d(ctx: Ctx) -> None:
    ctx.plan_only()
    n = sum(r.nbytes for r in ctx.reads())
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(90)
    pattern = torch.arange(1 << 20, dtype=torch.int32).remainder_(251).to(torch.uint8)
    for off in (0, max(0, n - pattern.numel())):  # the ends verify_h2d compares hold a pattern
        host[off:off + pattern.numel()].copy_(pattern[:n - off])
    ctx.state.update(host=host, dev=torch.empty(n, dtype=torch.uint8, device=ctx.device))
    ctx.sync()


def run_h2d(ctx: Ctx) -> dict:
    ctx.state["dev"].copy_(ctx.state["host"], non_blocking=True)
    ctx.sync()
    return {"bytes_copied": ctx.state["host"].numel(), "staging_bytes": ctx.state["host"].numel(), "pinned": True}


def verify_h2d(ctx: Ctx, limit: int | None = 3) -> dict:
    host, dev = ctx.state["host"], ctx.state["dev"]
    ends = [slice(0, 1 << 20), slice(max(0, host.numel() - (1 << 20)), host.numel())]
    ok = all(torch.equal(dev[e].cpu(), host[e]) for e in ends)
    return {"ok": ok, "checked": len(ends), "bad": [] if ok else ["device bytes differ from the host buffer"]}


LOADERS: dict[str, Loader] = {
    "distload": Loader("distload", run_distload),
    "eager": Loader("eager", run_eager),
    "distload_verify": Loader("distload_verify", run_distload_verify),
    "distload_no_readahead": Loader("distload_no_readahead", run_distload_no_readahead),
    "distload_no_huge_pages": Loader("distload_no_huge_pages", run_distload_no_huge_pages),
    "load_file": Loader("load_file", run_load_file),
    "engine": Loader("engine", run_engine),
    "fastsafetensors": Loader("fastsafetensors", run_fastsafetensors, setup_fastsafetensors),
    "instanttensor": Loader("instanttensor", run_instanttensor, setup_instanttensor),
    "floor": Loader("floor", run_floor, setup_floor, verify_floor),
    "floor_fresh": Loader("floor_fresh", run_floor, setup_floor_fresh, verify_floor),
    "h2d": Loader("h2d", run_h2d, setup_h2d, verify_h2d),
}


def unavailable(name: str, device: str) -> str | None:
    """Why loader ``name`` cannot run on ``device`` here, or None."""
    if name not in LOADERS:
        return f"unknown loader (known: {', '.join(LOADERS)})"
    cuda = device == "cuda" and torch.cuda.is_available()
    if name in ("instanttensor", "h2d") and not cuda:
        return "needs CUDA (InstantTensor only supports CUDA devices)" if name == "instanttensor" else "needs CUDA"
    if name in ("fastsafetensors", "instanttensor") and importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    return None
