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


def load_outcome(directory: str, tp: int, **kwargs) -> dict:
    """Loads on this rank; returns whether ``load`` raised MissingWeightsError and the report JSON."""
    try:
        loaded = distload.load(directory, distload.LoadConfig(tp=tp, device="cpu", **kwargs))
    except distload.MissingWeightsError as err:
        return {"raised": True, "message": str(err), "report": err.report.to_json()}
    return {"raised": False, "report": loaded.report.to_json()}


def load_and_forward(directory: str, tp: int, input_ids) -> dict:
    """Loads with the process group kept open, runs the model on ``input_ids``, and returns
    the report JSON, this rank's parameters (as numpy arrays) and its logits."""
    import torch

    with distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"), keep_group=True) as loaded:
        with torch.no_grad():
            logits = loaded.model(input_ids)
        state = {name: t.detach().numpy().copy() for name, t in loaded.model.state_dict().items()}
        return {"report": loaded.report.to_json(), "state": state,
                "dtypes": {name: str(t.dtype) for name, t in loaded.model.state_dict().items()},
                "logits": logits.numpy().copy()}
