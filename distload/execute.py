"""Runs one rank's planned reads into its parameters.

Reads are cut into chunks (``chunks``) that a pool of reader threads takes in file order,
so one large tensor is read by many threads. On the CPU, a chunk whose bytes land unchanged
in contiguous parameter memory is read straight into the parameter; others (casts, strided
destinations, comparisons) go through a private buffer per thread. On CUDA every chunk goes
through a fixed pool of small pinned slots and a copy thread (``staging``).

Comparisons (a tied weight checked against the tensor it is tied to) run after every other
chunk has landed, so they never read a parameter another thread is still filling.

A unit counts as loaded only after every chunk of its read arrived and was copied (on
CUDA: the copy's event completed); a failure anywhere loads nothing more and raises.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .checkpoint.pickled import load_pickle
from .chunks import Chunk, cut
from .config import DEFAULT_STAGING_MIB
from .fileio import CheckpointFile, fill, populate
from .plan import RankPlan, Read
from .readahead import WINDOW_BYTES, Readahead, spans

MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""largest chunk on the CPU: large enough that per-chunk Python work is small against its copy"""
CUDA_SLOT_BYTES = 2 * 1024 * 1024
"""pinned slot (and chunk) size on CUDA: 16 readers' 2 MB slot pairs stay in the CPU's cache, so
the copy to the device reads them from there (an H200 host: 8 readers x 2 slots of 2 MB moved
42.6 GB/s, 4 MB 40.3, 1 MB 32.5; ``benchmarks/pipeline_sweep.py``)"""
SLOTS_PER_READER = 2
"""pinned slots per reader thread on CUDA: one being filled, one being copied"""
TICK_SECONDS = 0.25
"""how often the reading thread reports progress and asks whether a peer failed (a store
round trip: at 50 ms it cost a fifth of an 8-rank load's CPU on 2 cores)"""
MIN_SLOT_BYTES = 64 * 1024
"""smallest staging slot a budget is cut into (fewer threads stage when the budget is tiny)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecResult:
    """What one rank's execute step did."""

    loaded: tuple[int, ...]
    """units fully read and copied (or verified)"""
    mismatched: tuple[int, ...]
    """verify units whose bytes differ from the parameter"""
    nonfinite: tuple[int, ...]
    """loaded units holding NaN or Inf (only with ``check_finite``)"""
    bytes_read: int
    """bytes requested from files"""
    files_opened: int
    """files whose data was read"""
    seconds: float
    """wall time of the step"""
    casts: tuple[str, ...]
    """``checkpoint dtype -> parameter dtype`` conversions that happened"""
    staging_bytes: int = 0
    """host staging memory allocated (pinned on CUDA)"""


class Executor:
    """Reads byte ranges with ``os.preadv`` on a thread pool and fills parameters.

    Args:
        device: where the parameters live.
        num_threads: reader threads (on the CPU one of them is the calling thread; on CUDA the
            calling thread issues the copies).
        staging_bytes: host memory for staging (pinned on CUDA); the most this rank holds
            beside its parameters.
        check_finite: scan each loaded piece for NaN/Inf, on the device, on that piece only.
        readahead_bytes: how far ahead of the readers cold files' bytes are asked for, on CUDA (0: not
            at all; ``readahead.window_for``).
    """

    def __init__(self, *, device: torch.device, num_threads: int = 4,
                 staging_bytes: int = DEFAULT_STAGING_MIB * 1024 * 1024, check_finite: bool = False,
                 readahead_bytes: int = WINDOW_BYTES) -> None:
        self.device = device
        self.check_finite = check_finite
        self.cuda = device.type == "cuda"
        per_thread = SLOTS_PER_READER if self.cuda else 1
        # a budget too small for every thread's slots runs fewer threads, never more memory
        self.num_threads = max(1, min(num_threads, staging_bytes // (per_thread * MIN_SLOT_BYTES)))
        slot = staging_bytes // (per_thread * self.num_threads)
        largest = CUDA_SLOT_BYTES if self.cuda else MAX_CHUNK_BYTES
        self.chunk_bytes = max(MIN_SLOT_BYTES, min(largest, slot - slot % 4096))  # a slot's share
        self.num_slots = per_thread * self.num_threads
        # the CPU's 16 MB chunks keep the disk busy through the kernel's own readahead: asking ahead
        # as well made cold loads slower on the 2-core VM (world 1: 1.28 s against 1.22; TP=2 x
        # DP=4: 3.62 against 2.83), while CUDA's 2 MB chunks gained (H200: 4.61 against 6.12)
        self.readahead_bytes = readahead_bytes if self.cuda else 0

    def run(self, plan: RankPlan, params: Mapping[str, torch.Tensor], *,
            skip: frozenset[int] = frozenset(),
            progress: Callable[[int, int], None] | None = None,
            abort_check: Callable[[], None] | None = None) -> ExecResult:
        """Fills ``params`` (name -> tensor on ``device``) from ``plan``.

        Args:
            skip: unit indices not to load (test hook: simulates a rank that dropped a unit).
            progress: called with (bytes done, bytes total) while reading, from this thread.
            abort_check: called every TICK_SECONDS; raises to stop early (another rank failed).

        Raises:
            CheckpointError: a file is shorter than its header says, naming file and tensor.
        """
        start = time.perf_counter()
        with torch.no_grad():
            for name in plan.zero:
                params[name].zero_()
            for name, value in plan.defaults:
                params[name].fill_(value)
            reads = [r for r in plan.reads if r.unit not in skip]
            files: dict[str, CheckpointFile | dict] = {}  # an open file, or a pickle's tensors
            try:
                for r in reads:
                    if r.tensor.file not in files:
                        files[r.tensor.file] = _open_pickle(r.tensor.file, reads) if r.tensor.pickled else \
                            CheckpointFile(r)
                job = _Job(self, reads, params, files)
                job.run(progress, abort_check)
            finally:
                for handle in files.values():
                    if isinstance(handle, CheckpointFile):
                        handle.close()
            nonfinite = job.nonfinite() if self.check_finite else []
        return ExecResult(loaded=tuple(job.loaded), mismatched=tuple(job.mismatched), nonfinite=tuple(nonfinite),
                          bytes_read=job.total, files_opened=len(files), seconds=time.perf_counter() - start,
                          casts=tuple(sorted(job.casts)), staging_bytes=job.staging_bytes)


class _Job:
    """One execute step: its chunks, destinations, per-read progress and the threads' state."""

    def __init__(self, ex: Executor, reads: list[Read], params: Mapping[str, torch.Tensor],
                 files: dict[str, "CheckpointFile | dict"]) -> None:
        self.ex = ex
        self.reads = reads
        self.files = files
        self.dests = [destination(params, r) for r in reads]
        # a chunk lands unchanged in contiguous memory: any byte boundary will do
        self.flat = [not r.verify and not r.tensor.pickled and d.dtype == r.tensor.dtype and d.is_contiguous()
                     for r, d in zip(reads, self.dests)]
        self.dest_bytes = [_bytes(d) if f else None for d, f in zip(self.dests, self.flat)]
        self.casts = {f"{_name(r.tensor.dtype)} -> {_name(d.dtype)}" for r, d in zip(reads, self.dests)
                      if r.tensor.dtype != d.dtype}
        cuts = [cut(i, r, ex.chunk_bytes, flat=self.flat[i]) for i, r in enumerate(reads)]
        files, offsets = [r.tensor.file for r in reads], [r.offset for r in reads]
        chunks = [c for pieces in cuts for c in pieces]
        chunks.sort(key=lambda c: (files[c.read], offsets[c.read] + c.start))  # in file order
        self.chunks: list[Chunk] = [c for c in chunks if not reads[c.read].verify]
        self.compared: list[Chunk] = [c for c in chunks if reads[c.read].verify]
        self.left = [len(pieces) for pieces in cuts]  # chunks not yet complete, per read
        self.loaded = [r.unit for r, n in zip(reads, self.left) if n == 0]  # empty pieces
        self.mismatched: list[int] = []
        self.total = sum(r.nbytes for r in reads)
        # slots no larger than the largest chunk staged: a small checkpoint pins little
        staged = max((c.nbytes for pieces, flat in zip(cuts, self.flat) if ex.cuda or not flat
                      for c in pieces), default=0)
        self.slot_bytes = -(-staged // 4096) * 4096
        self.staging_bytes = 0  # allocated so far
        self.done = [0] * (ex.num_threads + 1)  # bytes placed, per thread (summed for progress)
        self._next = itertools.count()
        self._taken = -1
        self._ends = list(itertools.accumulate(c.nbytes for c in self.chunks))  # bytes up to each chunk
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def run(self, progress: Callable[[int, int], None] | None, abort_check: Callable[[], None] | None) -> None:
        """Places every chunk (the comparisons last); raises the first failure of any thread."""
        ahead = Readahead(spans(self.chunks, self.reads, self._fd) if self.ex.readahead_bytes else (),
                          self.taken_bytes, window=self.ex.readahead_bytes)
        try:
            ahead.start()
            if self.ex.cuda:
                from .staging import run_staged  # CUDA only: imported where it is used
                run_staged(self, progress, abort_check)
            else:
                self._run_cpu(progress, abort_check)
            ahead.stop()  # before the comparisons: they read what is cached by now
            if self._error is None and self.compared:
                self._compare(progress, abort_check)
        except BaseException as err:  # an interrupt or a peer's failure
            self._fail(err)
        finally:
            ahead.stop()  # before the files are closed
        if self._error is not None:
            raise self._error
        if progress is not None:
            progress(self.total, self.total)

    def _fd(self, read: int) -> int | None:
        """The descriptor read number ``read`` is read from, None for a pickle."""
        handle = self.files[self.reads[read].tensor.file]
        return handle.fd if isinstance(handle, CheckpointFile) else None

    def _run_cpu(self, progress, abort_check) -> None:
        threads = [threading.Thread(target=self._cpu_worker, args=(t,), name=f"distload-read-{t}", daemon=True)
                   for t in range(1, min(self.ex.num_threads, len(self.chunks)))]
        for t in threads:
            t.start()
        try:
            self._cpu_worker(0, progress=progress, abort_check=abort_check)
        finally:
            self.join(threads, progress, abort_check)

    def join(self, threads: list[threading.Thread], progress, abort_check) -> None:
        """Waits for ``threads``, still reporting progress and asking after peers."""
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=TICK_SECONDS / len(threads))
            if not self._stop.is_set():
                self.tick(progress, abort_check)

    def tick(self, progress, abort_check) -> None:
        """Reports progress and asks whether a peer failed; a failure stops every thread."""
        try:
            if progress is not None:
                progress(sum(self.done), self.total)
            if abort_check is not None:
                abort_check()
        except BaseException as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def next_chunk(self) -> Chunk | None:
        """The next chunk no thread has taken, or None once all are taken or a thread failed."""
        i = next(self._next)
        self._taken = i  # no lock: racing readers may leave a slightly older index, fine for pacing
        return self.chunks[i] if i < len(self.chunks) and not self._stop.is_set() else None

    def taken_bytes(self) -> int:
        """Bytes of the chunks the readers have taken so far (an estimate, for pacing the readahead)."""
        if self._taken < 0 or not self._ends:
            return 0
        return self._ends[min(self._taken, len(self._ends) - 1)]

    def _cpu_worker(self, t: int, *, progress=None, abort_check=None) -> None:
        """Takes chunks until none is left; thread 0 (the caller's) also reports and checks peers."""
        buf: list[torch.Tensor] = []  # this thread's staging buffer, made at its first staged chunk
        next_tick = 0.0
        try:
            torch.set_grad_enabled(False)  # grad mode is per thread: views of parameters are written
            while (chunk := self.next_chunk()) is not None:
                self._place_cpu(chunk, buf, t)
                if t == 0 and time.monotonic() > next_tick:
                    self.tick(progress, abort_check)
                    next_tick = time.monotonic() + TICK_SECONDS
        except BaseException as err:
            self._fail(err)
            if t == 0:
                raise

    def _place_cpu(self, chunk: Chunk, buf: list[torch.Tensor], t: int) -> None:
        read, handle = self.reads[chunk.read], self.files[self.reads[chunk.read].tensor.file]
        if self.flat[chunk.read]:
            target = self.dest_bytes[chunk.read][chunk.start:chunk.stop]
            populate(target)
            fill(target, read, chunk, handle)
        else:
            src = self.staged(chunk, self.cpu_buffer(buf), handle)
            self.part(chunk).copy_(src)
        self.complete(chunk, t)

    def cpu_buffer(self, buf: list[torch.Tensor]) -> torch.Tensor:
        """A thread's staging buffer (pageable: only CPU copies read it), made on first use."""
        if not buf:
            buf.append(torch.empty(self.slot_bytes, dtype=torch.uint8))
            with self._lock:
                self.staging_bytes += self.slot_bytes
        return buf[0]

    def staged(self, chunk: Chunk, slot: torch.Tensor, handle) -> torch.Tensor:
        """Reads ``chunk`` into ``slot``; returns it as the sub-tensor it forms."""
        read = self.reads[chunk.read]
        staged = slot[:chunk.nbytes]
        fill(staged, read, chunk, handle)
        return staged.view(read.tensor.dtype).reshape(self.part_shape(chunk))

    def part(self, chunk: Chunk) -> torch.Tensor:
        """The part of the destination a chunk cut by rows fills."""
        part = self.dests[chunk.read]
        for i in chunk.prefix:
            part = part[i]
        return part[chunk.lo:chunk.hi] if self.reads[chunk.read].shape else part

    def part_shape(self, chunk: Chunk) -> tuple[int, ...]:
        shape = self.reads[chunk.read].shape
        if not shape:
            return ()
        level = len(chunk.prefix)
        return (chunk.hi - chunk.lo, *shape[level + 1:])

    def _compare(self, progress, abort_check) -> None:
        """Compares each compared read's bytes with its parameter, once every other chunk landed."""
        buf: list[torch.Tensor] = []
        next_tick = time.monotonic() + TICK_SECONDS
        for chunk in self.compared:
            if time.monotonic() > next_tick:
                self.tick(progress, abort_check)
                next_tick = time.monotonic() + TICK_SECONDS
            if self._stop.is_set():
                return
            read = self.reads[chunk.read]
            src = self.staged(chunk, self.cpu_buffer(buf), self.files[read.tensor.file])
            part = self.part(chunk)
            if not torch.equal(src.to(device=part.device, dtype=part.dtype), part) \
                    and read.unit not in self.mismatched:
                self.mismatched.append(read.unit)
            self.complete(chunk, 0)

    def complete(self, chunk: Chunk, t: int) -> None:
        """Counts a chunk as placed; its read's unit is loaded with its last chunk."""
        self.done[t] += chunk.nbytes
        with self._lock:
            self.left[chunk.read] -= 1
            if self.left[chunk.read] == 0:
                self.loaded.append(self.reads[chunk.read].unit)

    def nonfinite(self) -> list[int]:
        """Loaded units whose pieces hold NaN or Inf (one device sync for all)."""
        loaded = set(self.loaded)
        flags = []
        for r, d in zip(self.reads, self.dests):
            if r.unit in loaded and not r.verify and d.is_floating_point():
                scan = d.float() if d.dtype.itemsize == 1 else d  # FP8 has no isfinite kernel
                flags.append((r.unit, torch.isfinite(scan).all()))
        if not flags:
            return []
        ok = torch.stack([f for _, f in flags]).tolist()
        return sorted({unit for (unit, _), good in zip(flags, ok) if not good})


def _open_pickle(path: str, reads: list[Read]) -> dict[str, torch.Tensor]:
    """A pickle's tensors, those ``reads`` take from it contiguous: a strided view is copied once
    here, not once per chunk read from it."""
    return load_pickle(path, contiguous=frozenset(r.tensor.name for r in reads if r.tensor.file == path))


def destination(params: Mapping[str, torch.Tensor], read: Read) -> torch.Tensor:
    """The part of its parameter that ``read`` fills: its expert slot, narrowed along its dim."""
    dest = params[read.param]
    if read.slot is not None:
        dest = dest[read.slot]
    if read.dim is not None:
        dest = dest.narrow(read.dim, read.dest[0], read.dest[1] - read.dest[0])
    return dest


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 view."""
    return tensor.reshape(-1).view(torch.uint8)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
