"""Host-to-device copies on one stream, with one completion event per staging slot.

The CUDA path copies a few MB at a time out of pinned slots small enough to stay in the CPU's
cache. At that size torch's per-call cost (a slice, a copy, an event, a stream switch, each
taken under the GIL) is larger than the copy itself and stalls the reader threads: measured on
an H200 host, the same pipeline moved 18-21 GB/s through torch's calls and 36-43 GB/s through
the CUDA runtime called directly (``benchmarks/pipeline_sweep.py``). So where torch's CUDA
runtime library is loaded, byte copies and events go to it through ctypes; elsewhere (a ROCm
build, a runtime linked in statically) torch's own calls do the same work. Casts and strided
destinations always go through torch, on the same stream.

The calls that return at once (queue a copy, record or query an event) keep the GIL: handing
it to a reader and waiting to get it back cost 25-50 us a call, which made the copy thread the
bottleneck (readers waited for free slots half their time). Only waiting on an event lets it go.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_MEMCPY_HOST_TO_DEVICE = 1
_EVENT_FLAGS = 0x1 | 0x2  # cudaEventBlockingSync | cudaEventDisableTiming: a waiting thread sleeps
_NOT_READY = 600  # cudaErrorNotReady


class TorchCopies:
    """Copies and events through torch's own calls (the fallback, and the reference in tests).

    Args:
        device: the CUDA device the parameters live on.
        slots: how many staging slots there are (one event each).
    """

    def __init__(self, device: torch.device, slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # zeroing and default fills were queued on the current stream: copies come after them
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self._events = [torch.cuda.Event(blocking=True) for _ in range(slots)]
        self._recorded_torch = [False] * slots

    def copy_bytes(self, dst: torch.Tensor, dst_at: int, src: torch.Tensor, src_at: int, n: int) -> None:
        """Queues ``dst[dst_at:dst_at+n] = src[src_at:src_at+n]`` (flat uint8 tensors)."""
        with torch.cuda.stream(self.stream):
            dst[dst_at:dst_at + n].copy_(src[src_at:src_at + n], non_blocking=True)

    def copy_tensor(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queues ``dst.copy_(src)`` (a cast, or a strided destination)."""
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def record(self, slot: int) -> None:
        """Marks the end of the copies queued so far from ``slot``."""
        self._events[slot].record(self.stream)
        self._recorded_torch[slot] = True

    def done(self, slot: int) -> bool:
        """Whether ``slot``'s recorded copies have finished."""
        return not self._recorded_torch[slot] or self._events[slot].query()

    def wait(self, slot: int) -> None:
        """Blocks until ``slot``'s recorded copies have finished."""
        if self._recorded_torch[slot]:
            self._events[slot].synchronize()

    def close(self) -> None:
        """Waits for every queued copy (pinned memory may be freed after this)."""
        self.stream.synchronize()
        self._recorded_torch = [False] * len(self._events)


class RuntimeCopies(TorchCopies):
    """Byte copies and events through the CUDA runtime library torch loaded.

    Args:
        device: the CUDA device the parameters live on.
        slots: how many staging slots there are (one event each).
        lib: the runtime library (``runtime_library()``).
    """

    def __init__(self, device: torch.device, slots: int, lib: ctypes.CDLL) -> None:
        super().__init__(device, slots)
        self._lib = lib  # releases the GIL while a call runs: for waits
        self._fast = ctypes.PyDLL(lib._name)  # keeps it: for calls that return at once
        self._handle = ctypes.c_void_p(self.stream.cuda_stream)
        self._raw: list[ctypes.c_void_p] = []
        self._recorded = [False] * slots
        try:
            with torch.cuda.device(device):  # an event belongs to the device current when it is made
                for _ in range(slots):
                    event = ctypes.c_void_p()
                    self._check(lib.cudaEventCreateWithFlags(ctypes.byref(event), _EVENT_FLAGS),
                                "cudaEventCreateWithFlags")
                    self._raw.append(event)
        except BaseException:
            self.close()
            raise

    def copy_bytes(self, dst: torch.Tensor, dst_at: int, src: torch.Tensor, src_at: int, n: int) -> None:
        self._check(self._fast.cudaMemcpyAsync(ctypes.c_void_p(dst.data_ptr() + dst_at),
                                              ctypes.c_void_p(src.data_ptr() + src_at), ctypes.c_size_t(n),
                                              _MEMCPY_HOST_TO_DEVICE, self._handle), "cudaMemcpyAsync")

    def record(self, slot: int) -> None:
        self._check(self._fast.cudaEventRecord(self._raw[slot], self._handle), "cudaEventRecord")
        self._recorded[slot] = True

    def done(self, slot: int) -> bool:
        if not self._recorded[slot]:
            return True
        code = self._fast.cudaEventQuery(self._raw[slot])
        if code == _NOT_READY:
            return False
        self._check(code, "cudaEventQuery")
        return True

    def wait(self, slot: int) -> None:
        if self._recorded[slot]:
            self._check(self._lib.cudaEventSynchronize(self._raw[slot]), "cudaEventSynchronize")

    def close(self) -> None:
        self.stream.synchronize()
        for event in self._raw:
            self._lib.cudaEventDestroy(event)  # nothing to do about a failure here
        self._raw = []
        self._recorded = [False] * len(self._recorded)

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            self._lib.cudaGetErrorString.restype = ctypes.c_char_p
            text = self._lib.cudaGetErrorString(code) or b"unknown error"
            raise RuntimeError(f"{call} failed: {text.decode(errors='replace')} (error {code})")


@functools.cache
def runtime_library() -> ctypes.CDLL | None:
    """The CUDA runtime library this process loaded with torch, or None (not a CUDA build, not
    initialized, or linked in statically)."""
    if torch.version.cuda is None or not torch.cuda.is_initialized():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libcudart.so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(lib, name) for name in ("cudaMemcpyAsync", "cudaEventCreateWithFlags", "cudaEventQuery")):
            return lib
    return None


def open_copies(device: torch.device, slots: int) -> TorchCopies:
    """Copies for ``slots`` staging slots onto ``device``: through the runtime where it is found."""
    torch.cuda.init()
    lib = runtime_library()
    return RuntimeCopies(device, slots, lib) if lib is not None else TorchCopies(device, slots)
