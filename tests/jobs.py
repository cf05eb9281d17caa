"""Functions the multi-rank tests run on every rank (importable by pool workers)."""

from __future__ import annotations

import distload


def load_summary(directory: str, tp: int, **kwargs):
    """Loads on this rank and returns (complete, report json)."""
    try:
        loaded = distload.load(directory, distload.LoadConfig(tp=tp, device="cpu", **kwargs))
        return loaded.report.to_json()
    except distload.MissingWeightsError as err:
        return err.report.to_json()
