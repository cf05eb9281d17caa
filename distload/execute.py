"""Runs one rank's planned reads into its parameters.

The executor owns its threads, file descriptors and host buffers: reads go into
freshly allocated (pinned, for CUDA) host buffers on a small thread pool, and the
calling thread copies each finished buffer into its parameter slice. A unit counts
as loaded only after all its bytes arrived and its copy completed (on CUDA: the
copy's event has been waited on).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .checkpoint.pickled import load_pickle
from .errors import CheckpointError
from .plan import RankPlan, Read


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


class Executor:
    """Reads byte ranges with ``os.preadv`` on a thread pool and fills parameters.

    Args:
        device: where the parameters live.
        num_threads: concurrent reads.
        max_inflight_bytes: host memory held by reads not yet copied (at least one read).
        check_finite: scan each loaded piece for NaN/Inf, on the device, on that piece only.
    """

    def __init__(self, *, device: torch.device, num_threads: int = 4,
                 max_inflight_bytes: int = 256 * 1024 * 1024, check_finite: bool = False) -> None:
        self.device = device
        self.check_finite = check_finite
        self.num_threads = num_threads
        self.max_inflight_bytes = max_inflight_bytes
        self._pin = device.type == "cuda"

    def run(self, plan: RankPlan, params: Mapping[str, torch.Tensor], *,
            skip: frozenset[int] = frozenset(),
            progress: Callable[[int, int], None] | None = None,
            abort_check: Callable[[], None] | None = None) -> ExecResult:
        """Fills ``params`` (name -> tensor on ``device``) from ``plan``.

        Args:
            skip: unit indices not to load (test hook: simulates a rank that dropped a unit).
            progress: called with (bytes done, bytes total) after each read is placed.
            abort_check: called between reads; raises to stop early (another rank failed).

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
            files: dict[str, int | dict] = {}  # a read-only descriptor, or a pickle's tensors
            try:
                for r in reads:
                    if r.tensor.file not in files:
                        files[r.tensor.file] = load_pickle(r.tensor.file) if r.tensor.pickled else \
                            _open_read_only(r)
                loaded, mismatched, nonfinite, casts = self._pipeline(reads, params, files, progress, abort_check)
            finally:
                for handle in files.values():
                    if isinstance(handle, int):
                        os.close(handle)
        return ExecResult(loaded=tuple(loaded), mismatched=tuple(mismatched), nonfinite=tuple(nonfinite),
                          bytes_read=sum(r.nbytes for r in reads), files_opened=len(files),
                          seconds=time.perf_counter() - start, casts=tuple(sorted(casts)))

    def _pipeline(self, reads: list[Read], params: Mapping[str, torch.Tensor], files: dict[str, int | dict],
                  progress: Callable[[int, int], None] | None, abort_check: Callable[[], None] | None):
        loaded: list[int] = []
        mismatched: list[int] = []
        casts: set[str] = set()
        pending: deque[tuple[Read, Future]] = deque()
        copies: deque[tuple[Read, torch.cuda.Event, torch.Tensor]] = deque()  # async copies in flight
        finite: list[tuple[int, torch.Tensor]] = []  # (unit, 0-dim bool on the device), checked at the end
        inflight = 0
        done, total = 0, sum(r.nbytes for r in reads)
        next_check = 0.0
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="distload-read") as pool:
            it = iter(reads)
            nxt = next(it, None)
            while nxt is not None or pending:
                # keep the pool busy within the memory window; a pinned buffer counts until its
                # copy to the device has finished, so the window bounds pinned memory too
                while copies and nxt is not None and inflight + nxt.nbytes > self.max_inflight_bytes:
                    inflight -= self._finish_copy(copies.popleft(), loaded)
                while nxt is not None and (not pending or inflight + nxt.nbytes <= self.max_inflight_bytes):
                    pending.append((nxt, pool.submit(self._read, nxt, files[nxt.tensor.file])))
                    inflight += nxt.nbytes
                    nxt = next(it, None)
                read, fut = pending.popleft()
                buf = fut.result()
                if not self._pin:
                    inflight -= read.nbytes
                src = buf.view(read.tensor.dtype).reshape(read.shape)
                dest = params[read.param]
                if read.slot is not None:
                    dest = dest[read.slot]
                if read.dim is not None:
                    dest = dest.narrow(read.dim, read.dest[0], read.dest[1] - read.dest[0])
                if src.dtype != dest.dtype:
                    casts.add(f"{str(src.dtype).removeprefix('torch.')} -> {str(dest.dtype).removeprefix('torch.')}")
                if read.verify:
                    same = torch.equal(src.to(device=dest.device, dtype=dest.dtype), dest)
                    loaded.append(read.unit)
                    if not same:
                        mismatched.append(read.unit)
                elif self._pin:
                    # on the parameter's own device and stream, whatever the current device is
                    with torch.cuda.device(dest.device):
                        dest.copy_(src, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(torch.cuda.current_stream(dest.device))
                    copies.append((read, event, buf))  # buf must outlive the async copy
                else:
                    dest.copy_(src)
                    loaded.append(read.unit)
                if self.check_finite and not read.verify and dest.is_floating_point():
                    scan = dest.float() if dest.dtype.itemsize == 1 else dest  # FP8 has no isfinite kernel
                    finite.append((read.unit, torch.isfinite(scan).all()))
                done += read.nbytes
                if progress is not None:
                    progress(done, total)
                if abort_check is not None and time.monotonic() > next_check:
                    abort_check()
                    next_check = time.monotonic() + 0.05
        while copies:
            self._finish_copy(copies.popleft(), loaded)
        flags = torch.stack([f for _, f in finite]).tolist() if finite else []
        nonfinite = [unit for (unit, _), ok in zip(finite, flags) if not ok]
        return loaded, mismatched, nonfinite, casts

    @staticmethod
    def _finish_copy(copy: tuple[Read, "torch.cuda.Event", torch.Tensor], loaded: list[int]) -> int:
        """Waits for one async copy; its unit counts as loaded only now. Returns its bytes."""
        read, event, _ = copy
        event.synchronize()
        loaded.append(read.unit)
        return read.nbytes

    def _read(self, read: Read, handle: int | dict) -> torch.Tensor:
        buf = torch.empty(read.nbytes, dtype=torch.uint8, pin_memory=self._pin)
        if isinstance(handle, dict):  # a pickle's memory-mapped tensor: copy the same runs
            flat = handle[read.tensor.name].contiguous().reshape(-1).view(torch.uint8)
            for i in range(read.count):
                start = read.offset + i * read.stride
                buf[i * read.run:(i + 1) * read.run].copy_(flat[start:start + read.run])
            return buf
        view = memoryview((ctypes.c_ubyte * read.nbytes).from_address(buf.data_ptr())).cast("B") \
            if read.nbytes else memoryview(b"")
        for i in range(read.count):
            _pread_exact(handle, view[i * read.run:(i + 1) * read.run], read.offset + i * read.stride, read)
        return buf


def _open_read_only(read: Read) -> int:
    try:
        return os.open(read.tensor.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise CheckpointError(f"cannot open for reading: {err.strerror or err}", file=read.tensor.file,
                              tensor=read.tensor.name) from None


def _pread_exact(fd: int, view: memoryview, offset: int, read: Read) -> None:
    """Fills ``view`` from ``offset``, looping over short reads; EOF is a truncated file."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise CheckpointError(f"read failed at byte {offset + done}: {err.strerror or err}",
                                  file=read.tensor.file, tensor=read.tensor.name) from None
        if n == 0:
            raise CheckpointError(f"file ends at byte {offset + done}, before the tensor's data "
                                  f"(needed up to {read.tensor.end}); is it truncated?",
                                  file=read.tensor.file, tensor=read.tensor.name)
        done += n
