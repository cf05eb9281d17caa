"""Tunes the CUDA staging pipeline outside distload: reads a checkpoint's files, whole, into one
device buffer through pinned slots, for each variant of the pipeline, warm page cache, in one
process (so this measures the pipeline's shape, not a load: `load_bench.py` times loads).

Variants (each a row of the output):
- ``reads``: the reader threads' ``preadv`` into their slots only, no copy (the floor for that
  slot shape: small slots can stay in the CPU's cache);
- ``torch``: each thread copies each filled slot with ``Tensor.copy_(non_blocking=True)`` on its
  own stream and records an event, waiting for a slot's event before refilling it;
- ``cudart``: the same through the CUDA runtime called directly (``cudaMemcpyAsync``,
  ``cudaEventRecord``, ``cudaEventSynchronize``), which holds no GIL and dispatches nothing;
  its events spin while waited on; ``cudart_block``: events that block instead;
  ``cudart_1s``: blocking events, and every thread's copies on one shared stream;
- ``copier``: readers fill slots from one shared pool and one thread issues every copy;
- ``floor``: 16 MB ``preadv`` chunks into one pinned buffer allocated before the clock;
- ``h2d``: one copy of that pinned buffer to the device.

Each time includes allocating (and freeing) the variant's pinned slots, as a load pays it.

    python benchmarks/pipeline_sweep.py --preset llama8b-7g --threads 8,16 --slot-mib 2,4,8,16 --slots 2,4
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distload.device_copies import runtime_library  # noqa: E402  (after the path above)
from distload.staging import release_pinned  # noqa: E402


def _chunks(paths: list[str], chunk: int) -> list[tuple[int, int, int, int]]:
    """``(fd, file offset, bytes, device offset)`` for every chunk of every file, in file order."""
    out, at = [], 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            out.append((fd, off, n, at))
            at += n
    return out


def _view(ptr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * n).from_address(ptr)).cast("B")


def _pread(fd: int, view: memoryview, off: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], off + done)
        if n <= 0:
            raise OSError(f"short read at {off + done}")
        done += n


def run_variant(kind: str, chunks, dev: torch.Tensor, threads: int, slot: int, slots: int, rt) -> float:
    """One timed pass of variant ``kind``: ``threads`` readers with ``slots`` slots of ``slot``
    bytes each (``copier``: one shared pool of ``threads * slots`` slots and one copy thread)."""
    if kind == "copier":
        return _run_copier(chunks, dev, threads, slot, slots, rt)
    counter = itertools.count()
    errors: list[BaseException] = []
    dev_ptr = dev.data_ptr()
    flags = 3 if kind in ("cudart_block", "cudart_1s") else 2  # blocking sync (or spin), no timing
    shared = torch.cuda.Stream()

    def worker() -> None:
        try:
            bufs = [torch.empty(slot, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
            views = [_view(b.data_ptr(), slot) for b in bufs]
            stream = shared if kind == "cudart_1s" else torch.cuda.Stream()
            handle = ctypes.c_void_p(stream.cuda_stream)
            raw = kind.startswith("cudart")
            events: list = [None] * slots
            if raw:
                events = [ctypes.c_void_p() for _ in range(slots)]
                for e in events:
                    rt.cudaEventCreateWithFlags(ctypes.byref(e), flags)
                pending = [False] * slots
            turn = 0
            while True:
                i = next(counter)
                if i >= len(chunks):
                    break
                fd, off, n, at = chunks[i]
                turn = (turn + 1) % slots
                if kind == "torch" and events[turn] is not None:
                    events[turn].synchronize()
                elif raw and pending[turn]:
                    rt.cudaEventSynchronize(events[turn])
                _pread(fd, views[turn][:n], off)
                if kind == "torch":
                    with torch.cuda.stream(stream):
                        dev[at:at + n].copy_(bufs[turn][:n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                    events[turn] = ev
                elif raw:
                    rt.cudaMemcpyAsync(ctypes.c_void_p(dev_ptr + at), ctypes.c_void_p(bufs[turn].data_ptr()),
                                       ctypes.c_size_t(n), 1, handle)
                    rt.cudaEventRecord(events[turn], handle)
                    pending[turn] = True
            if raw:
                for e, p in zip(events, pending):
                    if p:
                        rt.cudaEventSynchronize(e)
                    rt.cudaEventDestroy(e)
            stream.synchronize()
            del bufs
        except BaseException as err:
            errors.append(err)

    return _timed(worker, threads, errors)


def _run_copier(chunks, dev: torch.Tensor, threads: int, slot: int, slots: int, rt) -> float:
    """Readers fill slots from one shared pool; one thread issues every copy on one stream and
    hands a slot back once its copy's event has fired."""
    import collections
    import queue
    counter = itertools.count()
    errors: list[BaseException] = []
    dev_ptr = dev.data_ptr()
    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    state: dict = {}

    def setup() -> None:
        state["bufs"] = bufs = [torch.empty(slot, dtype=torch.uint8, pin_memory=True) for _ in range(threads * slots)]
        state["views"] = [_view(b.data_ptr(), slot) for b in bufs]
        for k in range(len(bufs)):
            free.put(k)

    def reader() -> None:
        try:
            views = state["views"]
            while True:
                i = next(counter)
                if i >= len(chunks):
                    break
                fd, off, n, at = chunks[i]
                k = free.get()
                _pread(fd, views[k][:n], off)
                full.put((k, n, at))
        except BaseException as err:
            errors.append(err)
        finally:
            full.put(None)

    def copier() -> None:
        stream = torch.cuda.Stream()
        handle = ctypes.c_void_p(stream.cuda_stream)
        bufs = state["bufs"]
        events = [ctypes.c_void_p() for _ in bufs]
        for e in events:
            rt.cudaEventCreateWithFlags(ctypes.byref(e), 3)
        inflight: collections.deque = collections.deque()
        ended = 0
        while ended < threads or inflight:
            try:
                item = full.get_nowait() if inflight or ended == threads else full.get()
            except queue.Empty:
                k = inflight.popleft()
                rt.cudaEventSynchronize(events[k])
                free.put(k)
                continue
            if item is None:
                ended += 1
                continue
            k, n, at = item
            rt.cudaMemcpyAsync(ctypes.c_void_p(dev_ptr + at), ctypes.c_void_p(bufs[k].data_ptr()),
                               ctypes.c_size_t(n), 1, handle)
            rt.cudaEventRecord(events[k], handle)
            inflight.append(k)
            while inflight and rt.cudaEventQuery(events[inflight[0]]) == 0:
                free.put(inflight.popleft())
        for e in events:
            rt.cudaEventDestroy(e)

    start = time.perf_counter()
    setup()
    _run_threads([reader] * threads + [copier])
    torch.cuda.synchronize()
    state.clear()
    release_pinned()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def _timed(worker, threads: int, errors: list) -> float:
    start = time.perf_counter()
    _run_threads([worker] * threads)
    torch.cuda.synchronize()
    release_pinned()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def _run_threads(targets: list) -> None:
    """Runs each target on a thread of its own and waits for all."""
    pool = [threading.Thread(target=t) for t in targets]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def floor(chunks, big: torch.Tensor, threads: int) -> float:
    counter = itertools.count()
    base = big.data_ptr()

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= len(chunks):
                return
            fd, off, n, at = chunks[i]
            _pread(fd, _view(base + at, n), off)

    start = time.perf_counter()
    _run_threads([worker] * threads)
    return time.perf_counter() - start


def warm_files(preset: str) -> tuple[list[str], int]:
    """The preset's weight files (written if absent, then read through once) and their bytes."""
    from benchmarks.page_cache import make_warm
    from benchmarks.synth_checkpoints import ensure_checkpoint
    directory = ensure_checkpoint(preset)
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
    make_warm(paths)
    return paths, sum(os.path.getsize(x) for x in paths)


def baselines(paths: list[str], dev: torch.Tensor, runs: int) -> list[tuple[str, float]]:
    """``runs`` times each: the ``floor`` (16 threads, 16 MB chunks into one pinned buffer made
    before the clock) and ``h2d`` (that buffer copied to ``dev``), as ``(name, seconds)``."""
    out = []
    big = torch.empty(dev.numel(), dtype=torch.uint8, pin_memory=True)
    big.fill_(1)
    c16 = _chunks(paths, 16 << 20)
    for _ in range(runs):
        out.append(("floor", floor(c16, big, 16)))
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(big, non_blocking=True)
        torch.cuda.synchronize()
        out.append(("h2d", time.perf_counter() - t))
    for fd in {c[0] for c in c16}:
        os.close(fd)
    del big
    release_pinned()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama8b-7g")
    p.add_argument("--threads", default="8,16")
    p.add_argument("--slot-mib", default="2,4,8,16")
    p.add_argument("--slots", default="2,4")
    p.add_argument("--kinds", default="reads,torch,cudart")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    paths, total = warm_files(args.preset)
    torch.cuda.init()
    rt = runtime_library()
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    rows = [{"kind": name, "threads": 16, "seconds": s} if name == "floor" else {"kind": name, "seconds": s}
            for name, s in baselines(paths, dev, args.runs)]
    kinds = [k for k in args.kinds.split(",") if k in ("reads", "torch") or rt is not None]
    grid = list(itertools.product(kinds, map(int, args.threads.split(",")), map(int, args.slot_mib.split(",")),
                                  map(int, args.slots.split(","))))
    for rep in range(args.runs):
        for kind, threads, mib, slots in (grid if rep % 2 == 0 else grid[::-1]):
            chunks = _chunks(paths, mib << 20)
            s = run_variant(kind, chunks, dev, threads, mib << 20, slots, rt)
            rows.append({"kind": kind, "threads": threads, "slot_mib": mib, "slots": slots, "seconds": s})
            for fd in {c[0] for c in chunks}:
                os.close(fd)
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r.get("threads"), r.get("slot_mib"), r.get("slots")), []).append(r["seconds"])
    print(f"{total / 1e9:.2f} GB in {len(paths)} files; cudart {'found' if rt else 'not found'}")
    print(f"{'kind':>7} {'thr':>4} {'MiB':>4} {'slots':>5} {'median s':>9} {'GB/s':>6}")
    summary = []
    for (kind, threads, mib, slots), secs in sorted(groups.items(), key=lambda kv: statistics.median(kv[1])):
        med = statistics.median(secs)
        summary.append({"kind": kind, "threads": threads, "slot_mib": mib, "slots": slots, "median_s": med,
                        "gbps": total / med / 1e9, "runs": len(secs)})
        print(f"{kind:>7} {threads or '-':>4} {mib or '-':>4} {slots or '-':>5} {med:9.4f} {total / med / 1e9:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bytes": total, "files": len(paths), "runs": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
