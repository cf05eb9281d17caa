"""Pickle weight files (``.bin``/``.pt``), read only when asked and only as plain tensors.

``torch.load(weights_only=True)`` refuses any pickle that would construct objects
other than tensors and containers, so a checkpoint cannot run code here. With
``mmap=True`` the tensor data stays on disk until a rank copies its piece.
"""

from __future__ import annotations

import pickle

import torch

from ..errors import CheckpointError
from .header import TensorInfo


def load_pickle(path: str) -> dict[str, torch.Tensor]:
    """Returns the flat ``{name: tensor}`` of a pickle weight file, memory-mapped when possible.

    Raises:
        CheckpointError: the file is not a plain state dict of tensors (or asks to run code).
    """
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
    return state


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
