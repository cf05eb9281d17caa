"""Functions the rules-mode tests run on every rank (importable by pool workers)."""

from __future__ import annotations

import distload


def load_shards(directory: str, tp: int, options: dict) -> dict:
    """Loads with further LoadConfig ``options`` (``rules`` among them); returns whether ``load`` raised
    MissingWeightsError, the report JSON and, when it did not raise, this rank's sharded state dict
    (numpy arrays by checkpoint name)."""
    try:
        loaded = distload.load(directory, distload.LoadConfig(tp=tp, device="cpu", **options))
    except distload.MissingWeightsError as err:
        return {"raised": True, "message": str(err), "report": err.report.to_json()}
    state = {name: t.detach().numpy().copy() for name, t in loaded.model.sharded_state_dict().items()}
    return {"raised": False, "report": loaded.report.to_json(), "state": state}
