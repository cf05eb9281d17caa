"""Whether DMA straight out of the page cache can add to the pinned pipeline on CUDA: the
checkpoint's files mapped read-only, a few chunks at a time registered with the CUDA runtime
(``cudaHostRegister``, read-only), copied to the device, and unregistered, beside the staged
pipeline's readers. Warm page cache, one process, outside distload (``load_bench.py`` times
loads).

Rows:
- ``floor``: 16 threads ``preadv`` 16 MB chunks into one pinned buffer allocated before the
  clock; ``h2d``: one copy of that buffer to the device.
- ``steps C``: for C MiB chunks, run one after another on one thread: the time spent
  registering (PTEs not yet present: a fresh map), copying (with a wait), and unregistering;
  ``steps-pop C``: the same after the map's PTEs were filled by ``MADV_POPULATE_READ``.
- ``ring``: the staged pipeline's shape (readers ``preadv`` into a shared pool of 2 MiB pinned
  slots, one thread copying each full slot) over every byte.
- ``reg C P``: a registering pipeline over every byte: P threads populate the next chunks'
  PTEs, one thread registers and queues each chunk's copy, one waits for the copy and
  unregisters.
- ``hybrid F C P``: the ring over the first 1-F of the bytes while ``reg C P`` moves the rest,
  started together; the time until both are done.

    python benchmarks/register_sweep.py --preset llama8b-7g --chunk-mib 64,256 --fractions 0.25,0.4 --runs 3
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import mmap
import os
import queue
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.pipeline_sweep import _chunks, _run_copier, _run_threads, baselines, warm_files  # noqa: E402
from distload.device_copies import runtime_library  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_READ = 22
_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly
_ATTR_READ_ONLY_SUPPORTED = 113  # cudaDevAttrHostRegisterReadOnlySupported


class Maps:
    """Every file mapped read-only and shared (fresh: no PTE present), unmapped on close."""

    def __init__(self, paths: list[str]) -> None:
        self.maps: list[tuple[int, int, int]] = []  # (fd, address, size)
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            self.maps.append((fd, addr, size))

    def chunks(self, chunk: int) -> list[tuple[int, int, int]]:
        """``(address, bytes, device offset)`` of every chunk of every file, in file order."""
        out, at = [], 0
        for _, addr, size in self.maps:
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                out.append((addr + off, n, at))
                at += n
        return out

    def close(self) -> None:
        for fd, addr, size in self.maps:
            _libc.munmap(addr, size)
            os.close(fd)
        self.maps = []


def _check(rt, code: int, call: str) -> None:
    if code != 0:
        rt.cudaGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{call}: {rt.cudaGetErrorString(code).decode()} ({code})")


def steps(rt, paths, dev: torch.Tensor, chunk: int, populate: bool) -> dict:
    """Registers, copies and unregisters each chunk in turn; the seconds of each step, summed."""
    maps = Maps(paths)
    out = {"populate": 0.0, "register": 0.0, "copy": 0.0, "unregister": 0.0}
    clock = time.perf_counter
    try:
        for addr, n, at in maps.chunks(chunk):
            t = clock()
            if populate and _libc.madvise(addr, n, _MADV_POPULATE_READ) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ)")
            t1 = clock()
            _check(rt, rt.cudaHostRegister(ctypes.c_void_p(addr), ctypes.c_size_t(n), _REGISTER_READ_ONLY),
                   "cudaHostRegister")
            t2 = clock()
            _check(rt, rt.cudaMemcpy(ctypes.c_void_p(dev.data_ptr() + at), ctypes.c_void_p(addr),
                                     ctypes.c_size_t(n), 1), "cudaMemcpy")
            t3 = clock()
            _check(rt, rt.cudaHostUnregister(ctypes.c_void_p(addr)), "cudaHostUnregister")
            t4 = clock()
            out["populate"] += t1 - t
            out["register"] += t2 - t1
            out["copy"] += t3 - t2
            out["unregister"] += t4 - t3
    finally:
        maps.close()
    return out


def registering(rt, chunks: list[tuple[int, int, int]], dev: torch.Tensor, populaters: int) -> None:
    """Moves ``chunks`` by registering each one; see the module's ``reg`` row."""
    stream = torch.cuda.Stream()
    handle = ctypes.c_void_p(stream.cuda_stream)
    populated = [threading.Event() for _ in chunks]
    counter = itertools.count()
    done: queue.SimpleQueue = queue.SimpleQueue()
    errors: list[BaseException] = []
    window = threading.Semaphore(max(2, populaters + 1))  # populate at most this far ahead

    def populate() -> None:
        while not errors:
            window.acquire()  # before taking an index: permits go to chunks in order
            i = next(counter)
            if i >= len(chunks):
                return
            addr, n, _ = chunks[i]
            _libc.madvise(addr, n, _MADV_POPULATE_READ)
            populated[i].set()

    def register() -> None:
        try:
            for i, (addr, n, at) in enumerate(chunks):
                if populaters:
                    populated[i].wait()
                    window.release()
                _check(rt, rt.cudaHostRegister(ctypes.c_void_p(addr), ctypes.c_size_t(n), _REGISTER_READ_ONLY),
                       "cudaHostRegister")
                event = ctypes.c_void_p()
                _check(rt, rt.cudaEventCreateWithFlags(ctypes.byref(event), 3), "cudaEventCreateWithFlags")
                _check(rt, rt.cudaMemcpyAsync(ctypes.c_void_p(dev.data_ptr() + at), ctypes.c_void_p(addr),
                                              ctypes.c_size_t(n), 1, handle), "cudaMemcpyAsync")
                _check(rt, rt.cudaEventRecord(event, handle), "cudaEventRecord")
                done.put((addr, event))
        except BaseException as err:
            errors.append(err)
        finally:
            done.put(None)
            for _ in chunks:  # no populater stays waiting for room
                window.release()

    def unregister() -> None:
        while (item := done.get()) is not None:
            addr, event = item
            rt.cudaEventSynchronize(event)
            rt.cudaEventDestroy(event)
            rt.cudaHostUnregister(ctypes.c_void_p(addr))

    _run_threads([register, unregister] + [populate] * populaters)
    stream.synchronize()
    if errors:
        raise errors[0]


def reg_row(rt, paths, dev, chunk: int, populaters: int, fraction: float) -> float:
    """``reg`` (fraction 1) or ``hybrid`` (0 < fraction < 1): seconds until every byte is on the device."""
    maps = Maps(paths)
    try:
        big = maps.chunks(chunk)
        total = sum(n for _, n, _ in big)
        split = len(big)
        moved = 0
        while split > 0 and moved + big[split - 1][1] <= fraction * total + chunk / 2:
            split -= 1
            moved += big[split][1]
        first_end = big[split][2] if split < len(big) else total
        ring = [c for c in _chunks(paths, 2 << 20) if c[3] < first_end]
        start = time.perf_counter()
        parts = []
        if ring:
            parts.append(lambda: _run_copier(ring, dev, 8, 2 << 20, 2, rt))
        if big[split:]:
            parts.append(lambda: registering(rt, big[split:], dev, populaters))
        _run_threads(parts)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        for fd in {c[0] for c in ring}:
            os.close(fd)
        return seconds
    finally:
        maps.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama8b-7g")
    p.add_argument("--chunk-mib", default="64,256")
    p.add_argument("--populaters", default="0,4")
    p.add_argument("--fractions", default="0.25,0.4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    paths, total = warm_files(args.preset)
    torch.cuda.init()
    rt = runtime_library()
    if rt is None:
        print("no CUDA runtime library found", file=sys.stderr)
        return 1
    supported = ctypes.c_int()
    _check(rt, rt.cudaDeviceGetAttribute(ctypes.byref(supported), _ATTR_READ_ONLY_SUPPORTED, 0), "attribute")
    print(f"{total / 1e9:.2f} GB in {len(paths)} files; read-only registration supported: {bool(supported.value)}; "
          f"kernel {os.uname().release}", flush=True)
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    rows = [{"row": name, "seconds": s} for name, s in baselines(paths, dev, args.runs)]
    chunk_sizes = [int(c) << 20 for c in args.chunk_mib.split(",")]
    for chunk in chunk_sizes:
        for populate in (False, True):
            s = steps(rt, paths, dev, chunk, populate)
            rows.append({"row": f"steps{'-pop' if populate else ''} {chunk >> 20}", "seconds": sum(s.values()), **s})
            print(json.dumps(rows[-1]), flush=True)
    grid = [("ring", 0, 0, 0.0)]
    grid += [("reg", c, pp, 1.0) for c in chunk_sizes for pp in map(int, args.populaters.split(","))]
    grid += [("hybrid", c, pp, float(f)) for c in chunk_sizes for pp in map(int, args.populaters.split(","))
             for f in args.fractions.split(",")]
    for rep in range(args.runs):
        for kind, chunk, pp, frac in (grid if rep % 2 == 0 else grid[::-1]):
            s = reg_row(rt, paths, dev, chunk or (64 << 20), pp, frac)
            name = "ring" if kind == "ring" else f"{kind} {frac:g} {chunk >> 20} {pp}"
            rows.append({"row": name, "seconds": s})
            print(f"{name}: {s:.4f} s", flush=True)
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r["seconds"])
    print(f"{'row':>22} {'runs':>4} {'median s':>9} {'GB/s':>6}")
    summary = []
    for name, secs in sorted(groups.items(), key=lambda kv: statistics.median(kv[1])):
        med = statistics.median(secs)
        summary.append({"row": name, "runs": len(secs), "median_s": med, "gbps": total / med / 1e9})
        print(f"{name:>22} {len(secs):>4} {med:9.4f} {total / med / 1e9:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bytes": total, "files": len(paths), "read_only_supported": bool(supported.value),
                       "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
