"""Multi-rank test cases on the gloo pool, and the same cases on one GPU per rank with NCCL.

A test parametrized with ``and_on_gpus`` takes the ``ranks`` fixture (tests/conftest.py,
indirect): the session's gloo pool for a ``cpu`` case, the NCCL pool (one worker per visible
GPU, each on its own device, ``LOCAL_RANK``) for a ``cuda`` case. Its jobs take the device
(``ranks.device``), so both run the same job code and the same checks.
"""

from __future__ import annotations

from typing import Callable

import pytest


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def and_on_gpus(cases: list, world: Callable, ids: list[str] | None = None) -> list:
    """Each case on the gloo pool (``(*case, "cpu")``, its id and marks as they were), then each
    case of two ranks or more on one GPU per rank (``(*case, "cuda")``, id + ``-nccl``), marked
    ``gpu`` and skipped, with the reason, where fewer GPUs than its world are visible.

    Args:
        cases: parameter tuples, single values or ``pytest.param`` sets.
        world: the world size of a case (called with the case's values).
        ids: the cases' ids (default: the ``pytest.param`` ids).

    Returns:
        ``pytest.param`` sets for ``parametrize("...,ranks", ..., indirect=["ranks"])``.
    """
    gpus = visible_gpus()
    cpu, cuda = [], []
    for i, case in enumerate(cases):
        given = isinstance(case, type(pytest.param(None)))
        values = tuple(case.values) if given else case if isinstance(case, tuple) else (case,)
        marks = list(case.marks) if given else []
        name = ids[i] if ids is not None else case.id
        cpu.append(pytest.param(*values, "cpu", id=name, marks=marks))
        n = world(*values)
        if n >= 2:
            cuda.append(pytest.param(*values, "cuda", id=f"{name}-nccl", marks=[
                pytest.mark.gpu, pytest.mark.skipif(gpus < n, reason=f"needs {n} CUDA devices, {gpus} visible")]))
    return cpu + cuda
