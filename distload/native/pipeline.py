"""Runs a job's plain byte chunks through the compiled reader (``staged_reader.c``).

A chunk qualifies when its bytes land unchanged in contiguous device memory and come from a
safetensors file in runs the reader can take with ``pread`` (``eligible``): the common case of
every bf16 or FP8 weight, whole or sharded along its first dim. The others (casts, strided
destinations, short column runs, pickles) stay with the Python pipeline, which runs after.

The calling thread waits on the reader in ticks, reporting progress and asking after peers as
the Python pipeline does; a failure there sets the reader's stop flag. Chunks count as placed
only after the reader returned and said their copy completed, and none does after any failure.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Callable

import torch

from ..chunks import Chunk, segments
from ..errors import CheckpointError, DistloadError
from . import library

if TYPE_CHECKING:
    from ..execute import _Job

MIN_RUN_BYTES = 64 * 1024
"""a chunk of shorter runs (a column shard's rows) is one read call per run here: left to the
Python pipeline's one strided copy"""
_DONE, _SHORT_FILE, _CUDA = 0, 2, 3
_CALLS = {"set_device": "cudaSetDevice", "memcpy_async": "cudaMemcpyAsync",
          "stream_create": "cudaStreamCreateWithFlags", "stream_destroy": "cudaStreamDestroy",
          "event_create": "cudaEventCreateWithFlags", "event_record": "cudaEventRecord",
          "event_synchronize": "cudaEventSynchronize", "event_destroy": "cudaEventDestroy",
          "host_alloc": "cudaHostAlloc", "free_host": "cudaFreeHost"}
_P = ctypes.c_void_p


class _Cuda(ctypes.Structure):
    _fields_ = [(name, _P) for name in _CALLS]


class _CJob(ctypes.Structure):
    """``dl_job`` in ``staged_reader.c``, field for field."""

    _fields_ = [("count", ctypes.c_int64), ("seg_begin", _P), ("seg_fd", _P), ("seg_offset", _P),
                ("seg_nbytes", _P), ("dst", _P), ("nbytes", _P), ("done", _P), ("bytes_done", _P),
                ("slot_bytes", ctypes.c_int64), ("readers", ctypes.c_int32),
                ("slots_per_reader", ctypes.c_int32), ("device", ctypes.c_int32), ("stop", ctypes.c_int32),
                ("next", ctypes.c_int64), ("pinned", ctypes.c_int64), ("pinned_peak", ctypes.c_int64),
                ("status", ctypes.c_int32), ("code", ctypes.c_int32),
                ("failed_chunk", ctypes.c_int64), ("failed_offset", ctypes.c_int64),
                ("failed_call", ctypes.c_char_p), ("cuda", _Cuda), ("state", _P)]


def eligible(job: "_Job", read: int) -> bool:
    """Whether the compiled reader can place the chunks of read number ``read``: one byte copy
    each, from a file's runs."""
    r = job.reads[read]
    return job.flat[read] and not r.tensor.pickled and (r.count == 1 or r.run >= MIN_RUN_BYTES)


def runtime_calls(runtime: ctypes.CDLL) -> _Cuda:
    """The addresses of the CUDA runtime functions the reader calls, from torch's library."""
    return _Cuda(**{field: ctypes.cast(getattr(runtime, name), _P).value for field, name in _CALLS.items()})


def error_text(runtime: ctypes.CDLL) -> Callable[[int], str]:
    """A CUDA error code's description, from ``runtime``."""
    def text(code: int) -> str:
        runtime.cudaGetErrorString.restype = ctypes.c_char_p
        return (runtime.cudaGetErrorString(code) or b"unknown error").decode(errors="replace")
    return text


def run_native(job: "_Job", chunks: list[Chunk], calls: _Cuda, *, readers: int,
               slots_per_reader: int, slot_bytes: int, device_index: int, error_text: Callable[[int], str],
               progress: Callable[[int, int], None] | None, abort_check: Callable[[], None] | None,
               tick: float, copier: int) -> None:
    """Places ``chunks`` (eligible, in file order) on the device: each of ``readers`` threads pins
    ``slots_per_reader`` slots of ``slot_bytes`` (no chunk is larger) and frees them when it ends.
    The most pinned at once is added to ``job.staging_bytes``.

    Args:
        calls: the CUDA runtime's functions (``runtime_calls``).
        device_index: the CUDA device the readers' streams are made on.
        error_text: a CUDA error code's description.
        copier: the job's per-thread progress slot the reader's bytes are counted in.

    Raises:
        CheckpointError: a file is shorter than its header says, or a read failed.
        DistloadError: a CUDA call failed.
    """
    lib = library()
    arrays = _arrays(job, chunks)
    if max(c.nbytes for c in chunks) > slot_bytes:
        raise ValueError("a chunk is larger than a slot")
    done = torch.zeros(len(chunks), dtype=torch.uint8)
    bytes_done = torch.zeros(readers, dtype=torch.int64)
    c = _CJob(count=len(chunks), slot_bytes=slot_bytes, readers=readers,
              slots_per_reader=slots_per_reader, device=device_index, done=done.data_ptr(),
              bytes_done=bytes_done.data_ptr(), cuda=calls, **{name: a.data_ptr() for name, a in arrays.items()})
    lib.dl_start.argtypes = lib.dl_free.argtypes = [ctypes.POINTER(_CJob)]
    lib.dl_wait.argtypes = [ctypes.POINTER(_CJob), ctypes.c_int32]
    job.taken_index = lambda: c.next - 1  # the readahead paces itself on what the readers took
    try:
        started = lib.dl_start(ctypes.byref(c))
        if started != 0:
            raise DistloadError(f"the compiled reader could not start a thread: {os.strerror(started)}")
        while not lib.dl_wait(ctypes.byref(c), max(1, int(tick * 1000))):
            job.done[copier] = int(bytes_done.sum())
            job.tick(progress, abort_check)
            if job.stopped:
                c.stop = 1
    except BaseException:
        c.stop = 1  # an interrupt: the readers stop, and the copies they queued finish
        while c.state and not lib.dl_wait(ctypes.byref(c), 1000):
            pass
        raise
    finally:
        lib.dl_free(ctypes.byref(c))
        job.taken_index = None
        job.done[copier] = 0
        job.staging_bytes = max(job.staging_bytes, c.pinned_peak)
    if c.status != _DONE:
        raise _failure(job, chunks, c, error_text)
    if not job.stopped:
        for i in done.nonzero().flatten().tolist():
            job.complete(chunks[i], copier)


def _arrays(job: "_Job", chunks: list[Chunk]) -> dict[str, torch.Tensor]:
    """The job structure's per-chunk and per-segment arrays (a 7 GB load has 3,500 chunks: this
    runs before the first read, so it stays a few list operations per chunk)."""
    reads, files = job.reads, job.files
    base = [job.dest_bytes[i].data_ptr() if job.dest_bytes[i] is not None else 0 for i in range(len(reads))]
    fd_of = [files[r.tensor.file].fd if not r.tensor.pickled else -1 for r in reads]
    if all(reads[c.read].count == 1 for c in chunks):  # one segment per chunk
        fds = [fd_of[c.read] for c in chunks]
        offsets = [reads[c.read].offset + c.start for c in chunks]
        lengths = [c.stop - c.start for c in chunks]
        begin = range(len(chunks) + 1)
    else:
        begin, fds, offsets, lengths = [0], [], [], []
        for c in chunks:
            for offset, _, n in segments(reads[c.read], c.start, c.stop):
                fds.append(fd_of[c.read])
                offsets.append(offset)
                lengths.append(n)
            begin.append(len(fds))
    return {"seg_begin": torch.tensor(begin, dtype=torch.int64), "seg_fd": torch.tensor(fds, dtype=torch.int32),
            "seg_offset": torch.tensor(offsets, dtype=torch.int64),
            "seg_nbytes": torch.tensor(lengths, dtype=torch.int64),
            "dst": torch.tensor([base[c.read] + c.start for c in chunks], dtype=torch.int64),
            "nbytes": torch.tensor([c.stop - c.start for c in chunks], dtype=torch.int64)}


def _failure(job: "_Job", chunks: list[Chunk], c: _CJob, error_text: Callable[[int], str]) -> DistloadError:
    """The reader's first failure, naming the file and tensor it happened in."""
    read = job.reads[chunks[c.failed_chunk].read] if 0 <= c.failed_chunk < len(chunks) else None
    where = {"file": read.tensor.file, "tensor": read.tensor.name} if read is not None else {}
    if c.status == _CUDA:
        call = (c.failed_call or b"a CUDA call").decode()
        return DistloadError(f"copy to {job.ex.device} failed: {call} failed: {error_text(c.code)} "
                             f"(error {c.code})", **where)
    if c.status == _SHORT_FILE and read is not None:
        return CheckpointError(f"file ends at byte {c.failed_offset}, before the tensor's data "
                               f"(needed up to {read.tensor.end}); is it truncated?", **where)
    if read is not None:
        return CheckpointError(f"read failed at byte {c.failed_offset}: {os.strerror(c.code)}", **where)
    return DistloadError(f"the compiled reader failed (kind {c.status}, error {c.code})")
