"""Run a function on N ranks, for distload's own tests and for users' CI (``distload.testing``).

A ``RankPool`` keeps N worker processes (each imports torch once) and runs ``fn(*args)`` on
ranks 0..world-1 of a new job per call: torchrun's variables with a fresh rendezvous port,
and the job's default process group destroyed afterwards. Every rank's return value, or
its exception with its traceback, comes back; a rank still running at the timeout is
killed and named. ``fresh_processes=True`` starts new processes for every call instead.

As a pytest plugin, enabled explicitly (``pytest -p distload.testing``, or
``pytest_plugins = ["distload.testing"]`` in the root conftest.py), it adds the session
fixture ``distload_ranks`` (a ``RankPool``) and the options ``--distload-ranks N``,
``--distload-device auto|cpu|cuda`` (``auto``, the default: one GPU per rank with NCCL
when there are enough, else gloo on the CPU) and ``--distload-timeout SECONDS`` (ini keys
``distload_ranks``, ``distload_device``, ``distload_timeout``).

Example:
    >>> import distload
    >>> with RankPool(2) as ranks:
    ...     report = ranks.load(distload.example_checkpoint(), distload.LoadConfig(tp=2, device="cpu"))
    >>> report.ok, report.layout["tp"]
    (True, 2)
"""

from __future__ import annotations

from typing import Any, Callable

from .rankpool import (DEVICES, RankFailed, RankPool, RankResult, RankTimeout, WorkerDied, free_port,
                       load_report)

__all__ = ["RankFailed", "RankPool", "RankResult", "RankTimeout", "WorkerDied", "free_port", "load_report",
           "run_ranks"]


def run_ranks(world: int, fn: Callable, *args: Any, device: str = "auto", timeout: float = 180.0,
              env: dict[str, str] | None = None) -> list[RankResult]:
    """Runs ``fn(*args)`` once on ``world`` new processes and returns a ``RankResult`` per rank.

    Raises:
        ConfigError: as ``RankPool`` (device).

    Example:
        >>> import os
        >>> results = run_ranks(2, os.getpid)
        >>> [r.rank for r in results], all(r.ok for r in results), results[0].value != results[1].value
        ([0, 1], True, True)
    """
    with RankPool(world, device=device, timeout=timeout, fresh_processes=True) as pool:
        return pool.results(world, fn, *args, env=env)


# The pytest plugin: active only when enabled (-p distload.testing / pytest_plugins); no entry point.

def pytest_addoption(parser) -> None:
    group = parser.getgroup("distload", "distload multi-rank tests")
    group.addoption("--distload-ranks", type=int, default=None, metavar="N",
                    help="workers of the distload_ranks pool (ini distload_ranks; default 2)")
    group.addoption("--distload-device", choices=DEVICES, default=None,
                    help="cpu: gloo ranks; cuda: one GPU per rank; auto: cuda when there are enough GPUs, "
                         "else cpu (ini distload_device; default auto)")
    group.addoption("--distload-timeout", type=float, default=None, metavar="SECONDS",
                    help="seconds a call may take before its ranks are killed (ini distload_timeout; default 180)")
    parser.addini("distload_ranks", "workers of the distload_ranks pool", default="2")
    parser.addini("distload_device", "auto, cpu or cuda", default="auto")
    parser.addini("distload_timeout", "seconds a call may take before its ranks are killed", default="180")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "distload_gpu(n): needs n visible GPUs; skipped when there are fewer")


def _setting(config, name: str, kind: type):
    value = config.getoption(f"--distload-{name}")
    return kind(config.getini(f"distload_{name}")) if value is None else value


def _distload_ranks(request):
    """A ``RankPool`` for the whole test session, sized by ``--distload-ranks`` / ini ``distload_ranks``."""
    config = request.config
    with RankPool(_setting(config, "ranks", int), device=_setting(config, "device", str),
                  timeout=_setting(config, "timeout", float)) as pool:
        yield pool


def pytest_runtest_setup(item) -> None:
    marker = item.get_closest_marker("distload_gpu")
    if marker is not None:
        import pytest
        import torch
        needed = marker.args[0] if marker.args else 1
        if torch.cuda.device_count() < needed:
            pytest.skip(f"needs {needed} GPUs, {torch.cuda.device_count()} visible")


def _fixture():
    try:
        import pytest
    except ImportError:  # the harness works without pytest
        return None
    return pytest.fixture(scope="session", name="distload_ranks")(_distload_ranks)


distload_ranks = _fixture()
