"""The CUDA read pipeline: reader threads fill a fixed pool of small pinned slots, and the calling
thread copies each full slot to the device on one stream and hands it back once copied.

The pool is allocated once per load (two slots per reader, ``CUDA_SLOT_BYTES`` each) and
released at its end, whatever happens: torch's cache of freed pinned blocks is emptied too,
so the staging budget is not held for the life of the process. One copy thread measured
faster than each reader copying its own slots (42.6 against 40.0 GB/s on an H200 host,
``benchmarks/pipeline_sweep.py``): readers never wait on an event, and the slots a reader
fills next are the ones the copy engine has just read, still in the CPU's cache.

A chunk counts as placed only once its copy's event has completed; after a failure no copy
is queued, the copies in flight finish before their slots are freed, and none of them counts.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING, Callable

import torch

from .device_copies import TorchCopies, open_copies
from .errors import DistloadError
from .fileio import byte_view, fill

if TYPE_CHECKING:
    from .execute import _Job

COPIER = 0
"""the calling thread's index in the job's per-thread progress"""


def run_staged(job: "_Job", progress: Callable[[int, int], None] | None,
               abort_check: Callable[[], None] | None) -> None:
    """Places every chunk of ``job`` on its CUDA device through pinned slots.

    Raises:
        CheckpointError: a reader found a file shorter than its header says.
    """
    from .execute import TICK_SECONDS
    if not job.chunks:
        return
    readers = max(1, min(job.ex.num_threads, len(job.chunks)))
    count = min(job.ex.num_slots, len(job.chunks))
    slot = job.slot_bytes
    pool = torch.empty(count * slot, dtype=torch.uint8, pin_memory=True)
    job.staging_bytes = pool.numel()
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    for k in range(count):
        free.put(k)
    views = [pool[k * slot:(k + 1) * slot] for k in range(count)]
    raw = [byte_view(v) for v in views]
    copies: TorchCopies | None = None
    threads = [threading.Thread(target=_reader, args=(job, views, raw, free, full, TICK_SECONDS),
                                name=f"distload-read-{t}", daemon=True) for t in range(readers)]
    try:
        copies = open_copies(job.ex.device, count)
        for t in threads:
            t.start()
        _copy(job, copies, pool, slot, free, full, readers, progress, abort_check, TICK_SECONDS)
    except BaseException as err:
        job._fail(err)
        raise
    finally:
        for t in threads:  # a stopped job's readers leave within a tick
            if t.ident is not None:
                t.join()
        if copies is not None:
            copies.close()  # in-flight copies read the pool: they finish before it is freed
        # drop every reference to the pool: views in the queue, and in a failed thread's frames
        # (its exception's traceback keeps them alive, and with them the pinned memory)
        if job._error is not None:
            traceback.clear_frames(job._error.__traceback__)
        while not full.empty():
            full.get_nowait()
        views.clear()
        raw.clear()
        del pool
        release_pinned()


def _reader(job: "_Job", views: list[torch.Tensor], raw: list[memoryview], free: queue.SimpleQueue,
            full: queue.SimpleQueue, tick: float) -> None:
    """Takes chunks and free slots until either runs out, filling each slot from the file."""
    try:
        torch.set_grad_enabled(False)  # grad mode is per thread: views of parameters are made
        while (chunk := job.next_chunk()) is not None:
            k = _take(job, free, tick)
            if k is None:
                return
            read = job.reads[chunk.read]
            handle = job.files[read.tensor.file]
            if job.flat[chunk.read]:  # lands unchanged: one byte copy
                fill(views[k], read, chunk, handle, view=raw[k])
                full.put((k, chunk, None, None))
            else:  # a cast or a strided destination: the copy casts on the device
                full.put((k, chunk, job.part(chunk), job.staged(chunk, views[k], handle)))
    except BaseException as err:
        job._fail(err)
    finally:
        full.put(None)


def _take(job: "_Job", free: queue.SimpleQueue, tick: float) -> int | None:
    """A free slot, or None once the job stopped."""
    while not job.stopped:
        try:
            return free.get(timeout=tick)
        except queue.Empty:
            continue
    return None


def _copy(job: "_Job", copies: TorchCopies, pool: torch.Tensor, slot: int, free: queue.SimpleQueue,
          full: queue.SimpleQueue, readers: int, progress, abort_check, tick: float) -> None:
    """Queues each full slot's copy, and hands slots back as their copies complete, until every
    reader has ended and every copy has landed (or the job stopped)."""
    inflight: collections.deque = collections.deque()  # (slot, chunk), in the order queued
    ended = 0
    next_tick = 0.0

    def retire(wait: bool) -> None:
        while inflight and (wait or copies.done(inflight[0][0])):
            k, chunk = inflight.popleft()
            if wait:
                copies.wait(k)
                wait = False
            free.put(k)
            job.complete(chunk, COPIER)

    while ended < readers or inflight:
        if time.monotonic() > next_tick:
            job.tick(progress, abort_check)
            next_tick = time.monotonic() + tick
        if job.stopped:
            return
        try:
            item = full.get_nowait() if inflight else full.get(timeout=tick)
        except queue.Empty:
            retire(wait=True)  # nothing new: the oldest copy frees the next slot
            continue
        if item is None:
            ended += 1
            continue
        k, chunk, part, src = item
        try:
            if part is None:
                copies.copy_bytes(job.dest_bytes[chunk.read], chunk.start, pool, k * slot, chunk.nbytes)
            else:
                copies.copy_tensor(part, src)
            copies.record(k)
        except RuntimeError as err:  # the runtime's error, or out of device memory for a cast
            read = job.reads[chunk.read]
            raise DistloadError(f"copy to {job.ex.device} failed: {err}", file=read.tensor.file,
                                tensor=read.tensor.name) from err
        inflight.append((k, chunk))
        retire(wait=False)


def release_pinned() -> None:
    """Hands freed pinned memory back to the system: torch keeps freed pinned blocks cached for
    reuse, which would hold the staging budget for the life of the process."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):  # torch >= 2.9, older
        empty = getattr(torch._C, name, None)
        if empty is not None:
            empty()
            return
