"""Pickle weight files (``.bin``/``.pt``), read only when asked and only as plain tensors.

``torch.load(weights_only=True)`` refuses any pickle that would construct objects
other than tensors and containers, so a checkpoint cannot run code here. With
``mmap=True`` the tensor data stays on disk until a rank copies its piece.

Only what a safetensors file could hold is accepted: dense (strided), real, non-quantized
tensors with data, of the safetensors dtypes. A tensor may be a view (a storage offset, any
strides): its ``TensorInfo`` offsets count its elements in row-major order from its own first
element, and the executor reads it through a contiguous copy made once (``load_pickle``'s
``contiguous``), never through its storage.
"""

from __future__ import annotations

import pickle

import torch

from ..errors import CheckpointError
from .files import require_regular
from .header import DTYPES, ITEMSIZE, TensorInfo


def load_pickle(path: str, *, contiguous: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Returns the flat ``{name: tensor}`` of a pickle weight file, memory-mapped when possible.

    Args:
        path: the ``.bin`` / ``.pt`` file.
        contiguous: names whose tensors are returned contiguous in row-major order (a strided
            view copied once, here, rather than on every read of it); the others as stored.

    Raises:
        CheckpointError: the file is not a plain state dict of tensors (or asks to run code), or
            holds a tensor safetensors could not (sparse, quantized, complex, no data, another dtype).
    """
    require_regular(path, what="pickle weight file")  # torch.load would block on a FIFO
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refused: the pickle holds more than plain tensors (weights_only): "
                              f"{_refusal(err)}", file=path) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"pickle weight file is unreadable: {err}", file=path) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError("pickle weight file is not a flat dict of name -> tensor", file=path)
    for name, t in state.items():
        why = _unloadable(t)
        if why is not None:
            raise CheckpointError(f"tensor {name} {why}", file=path, tensor=name)
    # a negative-bit view (torch's lazy negation) is resolved too: its bytes are not its values
    return {name: t.resolve_neg().contiguous() if name in contiguous else t for name, t in state.items()}


def _unloadable(t: torch.Tensor) -> str | None:
    """What makes ``t`` something a safetensors file could not hold, or None."""
    if t.is_nested:
        return "is nested; only dense tensors can be loaded"
    if t.layout != torch.strided:
        what = "sparse" if "sparse" in str(t.layout) else "not dense"
        return f"is {what} ({t.layout}); only dense tensors can be loaded"
    if t.is_quantized:
        return f"is quantized ({t.dtype}, {t.qscheme()}); only non-quantized tensors can be loaded"
    if t.is_complex():
        return f"is complex ({t.dtype}); only real tensors can be loaded"
    if t.dtype not in ITEMSIZE:
        return f"has dtype {t.dtype}, which safetensors cannot hold (it knows {', '.join(DTYPES)})"
    if t.device.type != "cpu":  # meta tensors survive map_location="cpu": a shape with no data
        return f"has no data on the CPU (device {t.device}); only tensors with data can be loaded"
    return None


_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _refusal(err: Exception) -> str:
    """What torch's weights_only unpickler refused (``unsupported GLOBAL posix.system``), without its
    boilerplate, whose first line advises re-running with ``weights_only=False``: not for a checkpoint."""
    lines = [line.strip() for line in str(err).splitlines()]
    useful = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    return " ".join(useful) or type(err).__name__


def read_pickle_header(path: str) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a pickle weight file (its data stays memory-mapped)."""
    out = {}
    for name, t in load_pickle(path).items():
        nbytes = t.numel() * t.element_size()
        out[name] = TensorInfo(name=name, file=path, dtype=t.dtype, shape=tuple(t.shape), begin=0, end=nbytes,
                               pickled=True)
    return out
