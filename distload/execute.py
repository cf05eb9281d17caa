"""Runs one rank's planned reads into its parameters.

Reads are cut into chunks (``chunks``) that a pool of reader threads takes in file order,
so one large tensor is read by many threads. Where a chunk's bytes land unchanged in
contiguous parameter memory on the CPU, it is read straight into the parameter. Otherwise
it is read into a staging slot, a fixed set allocated once per load (pinned on CUDA; two
per thread, so a thread reads into one while the other's copy to the device runs on the
thread's own stream), and copied, cast or compared from there.

A unit counts as loaded only after every chunk of its read arrived and was copied (on
CUDA: the copy's event was waited on); a failure anywhere loads nothing more and raises.
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

MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""largest chunk: large enough that per-chunk Python work is small against its copy"""
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
        num_threads: reader threads (one reads on the calling thread).
        staging_bytes: host memory for staging slots (pinned on CUDA); the most this rank
            holds beside its parameters. Cut into two slots per thread.
        check_finite: scan each loaded piece for NaN/Inf, on the device, on that piece only.
    """

    def __init__(self, *, device: torch.device, num_threads: int = 4,
                 staging_bytes: int = DEFAULT_STAGING_MIB * 1024 * 1024, check_finite: bool = False) -> None:
        self.device = device
        self.check_finite = check_finite
        self.cuda = device.type == "cuda"
        # a budget too small for two slots per thread runs fewer threads, never more memory
        self.num_threads = max(1, min(num_threads, staging_bytes // (2 * MIN_SLOT_BYTES)))
        slot = staging_bytes // (2 * self.num_threads)
        self.chunk_bytes = max(MIN_SLOT_BYTES, min(MAX_CHUNK_BYTES, slot - slot % 4096))  # a slot's share

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
                try:
                    job.run(progress, abort_check)
                finally:
                    if self.cuda and job.staging_bytes:
                        _release_pinned()
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
        self.casts = {f"{_name(r.tensor.dtype)} -> {_name(d.dtype)}" for r, d in zip(reads, self.dests)
                      if r.tensor.dtype != d.dtype}
        self.chunks: list[Chunk] = [c for i, r in enumerate(reads)
                                    for c in cut(i, r, ex.chunk_bytes, flat=self.flat[i])]
        self.chunks.sort(key=lambda c: (reads[c.read].tensor.file, reads[c.read].offset + c.start))
        self.left = [0] * len(reads)  # chunks not yet complete, per read
        for c in self.chunks:
            self.left[c.read] += 1
        self.loaded = [r.unit for r, n in zip(reads, self.left) if n == 0]  # empty pieces
        self.mismatched: list[int] = []
        self.total = sum(r.nbytes for r in reads)
        # slots no larger than the largest chunk staged: a small checkpoint pins little
        staged_sizes = [c.nbytes for c in self.chunks if ex.cuda or not self.flat[c.read]]
        self.slot_bytes = -(-max(staged_sizes, default=0) // 4096) * 4096
        self.done = [0] * ex.num_threads  # bytes placed, per thread (summed for progress)
        self.staged = bool(staged_sizes)  # CUDA always (pinned); CPU only for chunks that cannot land directly
        self.staging_bytes = 0  # allocated so far (slots are allocated by the threads that use them)
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def run(self, progress: Callable[[int, int], None] | None, abort_check: Callable[[], None] | None) -> None:
        threads = [threading.Thread(target=self._worker, args=(t,), name=f"distload-read-{t}", daemon=True)
                   for t in range(1, min(self.ex.num_threads, len(self.chunks)))]
        for t in threads:
            t.start()
        try:
            self._worker(0, progress=progress, abort_check=abort_check)
        except BaseException as err:  # an interrupt or a peer's failure: stop the readers
            self._fail(err)
        finally:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=TICK_SECONDS / len(threads))
                if not self._stop.is_set():
                    self._tick(progress, abort_check)
        if self._error is not None:
            raise self._error
        if progress is not None:
            progress(self.total, self.total)

    def _tick(self, progress, abort_check) -> None:
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

    def _worker(self, t: int, *, progress=None, abort_check=None) -> None:
        """Takes chunks until none is left; thread 0 (the caller's) also reports and checks peers."""
        slots = _Slots(self)
        next_tick = 0.0
        try:
            torch.set_grad_enabled(False)  # grad mode is per thread: views of parameters are written
            while not self._stop.is_set():
                i = next(self._next)
                if i >= len(self.chunks):
                    break
                self._place(self.chunks[i], slots, t)
                if t == 0 and time.monotonic() > next_tick:
                    self._tick(progress, abort_check)
                    next_tick = time.monotonic() + TICK_SECONDS
            for chunk in slots.drain():
                self._complete(chunk)
        except BaseException as err:
            self._fail(err)
            slots.drain()  # in-flight copies must finish before their pinned slots are freed
            if t == 0:
                raise

    def _place(self, chunk: Chunk, slots: "_Slots", t: int) -> None:
        read, dest = self.reads[chunk.read], self.dests[chunk.read]
        handle = self.files[read.tensor.file]
        if self.flat[chunk.read] and not self.ex.cuda:
            target = _bytes(dest)[chunk.start:chunk.stop]
            populate(target)
            fill(target, read, chunk, handle)
            self._complete(chunk, t)
            return
        buf, finished = slots.take()
        for done in finished:
            self._complete(done)
        staged = buf[:chunk.nbytes]
        fill(staged, read, chunk, handle)
        if self.flat[chunk.read]:  # CUDA, contiguous: one byte copy; complete once it has run
            slots.copy(_bytes(dest)[chunk.start:chunk.stop], staged, chunk)
            self.done[t] += chunk.nbytes
            return
        part = dest
        for i in chunk.prefix:
            part = part[i]
        if read.shape:
            part = part[chunk.lo:chunk.hi]
        src = staged.view(read.tensor.dtype).reshape(part.shape)
        if read.verify:
            if not torch.equal(src.to(device=part.device, dtype=part.dtype), part):
                with self._lock:
                    self.mismatched.append(read.unit)
        elif self.ex.cuda:  # cast or strided: the copy casts on the device
            slots.copy(part, src, chunk)
            self.done[t] += chunk.nbytes
            return
        else:
            part.copy_(src)
        self._complete(chunk, t)

    def _complete(self, chunk: Chunk, t: int | None = None) -> None:
        """Counts a chunk as placed; its read's unit is loaded with its last chunk."""
        if t is not None:
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


class _Slots:
    """One thread's two staging slots and, on CUDA, its copy stream and the copies in flight."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.ex = ex = job.ex
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.inflight: list[tuple[torch.cuda.Event, Chunk] | None] = [None, None]
        self.turn = 0
        self.stream = None
        if job.staged and ex.cuda:
            self.stream = torch.cuda.Stream(device=ex.device)
            # zeroing and default fills run on the default stream before any copy
            self.stream.wait_stream(torch.cuda.current_stream(ex.device))

    def take(self) -> tuple[torch.Tensor, list[Chunk]]:
        """Returns the next free slot (waiting for its last copy) and the chunks that copy finished."""
        self.turn ^= 1
        if self.bufs[self.turn] is None:  # one at a time: a thread that takes one chunk pins one slot
            self.bufs[self.turn] = torch.empty(self.job.slot_bytes, dtype=torch.uint8, pin_memory=self.ex.cuda)
            with self.job._lock:
                self.job.staging_bytes += self.job.slot_bytes
        finished = []
        pending = self.inflight[self.turn]
        if pending is not None:
            pending[0].synchronize()
            finished.append(pending[1])
            self.inflight[self.turn] = None
        return self.bufs[self.turn], finished

    def copy(self, dest: torch.Tensor, src: torch.Tensor, chunk: Chunk) -> None:
        """Starts the copy of the current slot into ``dest`` on this thread's stream."""
        with torch.cuda.stream(self.stream):
            dest.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.inflight[self.turn] = (event, chunk)

    def drain(self) -> list[Chunk]:
        """Waits for every copy in flight; returns their chunks."""
        finished = []
        for k, pending in enumerate(self.inflight):
            if pending is not None:
                pending[0].synchronize()
                finished.append(pending[1])
                self.inflight[k] = None
        return finished


def _open_pickle(path: str, reads: list[Read]) -> dict[str, torch.Tensor]:
    """A pickle's tensors, those ``reads`` take from it contiguous: a strided view is copied once
    here, not once per chunk read from it."""
    return load_pickle(path, contiguous=frozenset(r.tensor.name for r in reads if r.tensor.file == path))


def _release_pinned() -> None:
    """Hands the staging slots' pinned memory back to the system: torch keeps freed pinned blocks
    cached for reuse, which would hold the staging budget for the life of the process."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):  # torch >= 2.9, older
        empty = getattr(torch._C, name, None)
        if empty is not None:
            empty()
            return


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
