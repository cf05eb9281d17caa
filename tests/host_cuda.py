"""A stand-in for the CUDA runtime functions the compiled reader calls, working on host memory:
a "copy to the device" is a memmove into CPU memory, streams and events are counted handles.
With it the compiled reader's threads, chunking, completion and failure handling run in CI,
which has no GPU; the real runtime's run is the ``gpu`` cases of tests/test_execute.py.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time

from distload.native.pipeline import _CALLS, _Cuda

_INT = ctypes.c_int
_P = ctypes.c_void_p
_SIGNATURES = {
    "set_device": (_INT,),
    "memcpy_async": (_P, _P, ctypes.c_size_t, _INT, _P),
    "stream_create": (_P, ctypes.c_uint),
    "stream_destroy": (_P,),
    "event_create": (_P, ctypes.c_uint),
    "event_record": (_P, _P),
    "event_synchronize": (_P,),
    "event_destroy": (_P,),
    "host_alloc": (_P, ctypes.c_size_t, ctypes.c_uint),
    "free_host": (_P,),
}
ILLEGAL_ADDRESS = 700
"""cudaErrorIllegalAddress: what a failing copy returns here"""


class HostCuda:
    """The runtime's calls, on the host.

    Args:
        fail_copy: the copy (counted from 1, over all readers) that returns ILLEGAL_ADDRESS.
        copy_seconds: how long each copy sleeps first (a slow device, so a stop lands mid-load).
    """

    def __init__(self, *, fail_copy: int | None = None, copy_seconds: float = 0.0) -> None:
        self.fail_copy = fail_copy
        self.copy_seconds = copy_seconds
        self.copies = 0
        self.live: set[int] = set()  # streams and events made and not yet destroyed
        self.devices: set[int] = set()
        self.host: dict[int, ctypes.Array] = {}  # host memory "pinned" and not yet freed, by address
        self._handles = itertools.count(1)
        self._lock = threading.Lock()
        self._callbacks = {name: ctypes.CFUNCTYPE(_INT, *_SIGNATURES[name])(getattr(self, name)) for name in _CALLS}

    def calls(self) -> _Cuda:
        """The structure the reader takes (valid while this object lives)."""
        return _Cuda(**{name: ctypes.cast(cb, _P).value for name, cb in self._callbacks.items()})

    def set_device(self, index: int) -> int:
        self.devices.add(index)
        return 0

    def memcpy_async(self, dst: int, src: int, n: int, kind: int, stream: int) -> int:
        if self.copy_seconds:
            time.sleep(self.copy_seconds)
        with self._lock:
            self.copies += 1
            if self.copies == self.fail_copy:
                return ILLEGAL_ADDRESS
            assert kind == 1 and stream in self.live, "a host-to-device copy on a live stream"
        ctypes.memmove(dst, src, n)
        return 0

    def _make(self, out: int) -> int:
        with self._lock:
            handle = next(self._handles)
            self.live.add(handle)
        ctypes.c_void_p.from_address(out).value = handle
        return 0

    def _destroy(self, handle: int) -> int:
        with self._lock:
            self.live.remove(handle)
        return 0

    def stream_create(self, out: int, flags: int) -> int:
        return self._make(out)

    def event_create(self, out: int, flags: int) -> int:
        return self._make(out)

    def stream_destroy(self, handle: int) -> int:
        return self._destroy(handle)

    def event_destroy(self, handle: int) -> int:
        return self._destroy(handle)

    def event_record(self, event: int, stream: int) -> int:
        return 0

    def event_synchronize(self, event: int) -> int:
        return 0

    def host_alloc(self, out: int, size: int, flags: int) -> int:
        buf = (ctypes.c_ubyte * size)()
        with self._lock:
            self.host[ctypes.addressof(buf)] = buf
        ctypes.c_void_p.from_address(out).value = ctypes.addressof(buf)
        return 0

    def free_host(self, address: int) -> int:
        with self._lock:
            del self.host[address]
        return 0

    @staticmethod
    def error_text(code: int) -> str:
        return "an illegal memory access was encountered" if code == ILLEGAL_ADDRESS else "unknown error"
