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


def load_outcome(directory: str, tp: int, options: dict | None = None, device: str = "cpu") -> dict:
    """Loads on this rank (on ``device``: ``cuda`` is this rank's GPU, with NCCL) with further
    LoadConfig ``options``; returns whether ``load`` raised MissingWeightsError, its message and
    the report JSON."""
    try:
        loaded = distload.load(directory, distload.LoadConfig(tp=tp, device=device, **(options or {})))
    except distload.MissingWeightsError as err:
        return {"raised": True, "message": str(err), "report": err.report.to_json()}
    return {"raised": False, "report": loaded.report.to_json()}


def load_and_forward(directory: str, tp: int, input_ids, device: str = "cpu") -> dict:
    """Loads on ``device`` with the process group kept open, runs the model on ``input_ids``, and
    returns the report JSON, this rank's parameters (as numpy arrays) and its logits."""
    import torch

    with distload.load(directory, distload.LoadConfig(tp=tp, device=device), keep_group=True) as loaded:
        with torch.no_grad():
            logits = loaded.model(input_ids.to(device))
        return {"report": loaded.report.to_json(), "state": numpy_state(loaded.model),
                "dtypes": {name: str(t.dtype) for name, t in loaded.model.state_dict().items()},
                "logits": logits.cpu().numpy().copy()}


def numpy_state(model) -> dict:
    """The model's state dict as numpy arrays in host memory (from any device)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def group_lifetime(directory: str, tp: int) -> dict:
    """Whether the process group exists while a ``keep_group`` load is held, after ``close()``,
    and after a ``keep_group`` load that raised MissingWeightsError."""
    import torch.distributed as dist

    config = distload.LoadConfig(tp=tp, device="cpu")
    loaded = distload.load(directory, config, keep_group=True)
    during = dist.is_initialized()
    loaded.close()
    after_close = dist.is_initialized()
    skip = distload.LoadConfig(tp=tp, device="cpu", skip_units={0: ("model.norm.weight",)})
    try:
        distload.load(directory, skip, keep_group=True)
        raised = False
    except distload.MissingWeightsError:
        raised = True
    return {"during": during, "after_close": after_close, "raised": raised,
            "after_failed_load": dist.is_initialized()}


def forward_after_close(directory: str, tp: int) -> str:
    """Runs the model after ``load`` closed its group (no keep_group); returns the error text."""
    import torch

    loaded = distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"))
    try:
        loaded.model(torch.tensor([[1, 2]]))
    except distload.DistloadError as err:
        return str(err)
    return "no error"


def load_and_forward_pp(directory: str, tp: int, pp: int, input_ids, device: str = "cpu") -> dict:
    """Like ``load_and_forward`` with pipeline stages: logits come back from the last stage only."""
    import torch

    with distload.load(directory, distload.LoadConfig(tp=tp, pp=pp, device=device), keep_group=True) as loaded:
        with torch.no_grad():
            logits = loaded.model(input_ids.to(device))
        return {"report": loaded.report.to_json(), "state": numpy_state(loaded.model),
                "logits": None if logits is None else logits.cpu().numpy().copy()}


def load_on_nodes(directory: str, tp: int, ranks_per_node: int, options: dict | None = None) -> dict:
    """``load_outcome`` with the ranks grouped into nodes of ``ranks_per_node`` consecutive ranks
    (``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` as torchrun sets them on each node)."""
    import os

    os.environ["LOCAL_RANK"] = str(int(os.environ["RANK"]) % ranks_per_node)
    os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)
    try:
        return load_outcome(directory, tp, options)
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE", None)


def load_on_nodes_from(directories: list[str], tp: int, ranks_per_node: int, options: dict | None = None) -> dict:
    """``load_on_nodes`` with each node loading its own copy of the checkpoint: node ``i`` (ranks
    ``i * ranks_per_node`` on) loads ``directories[i]``."""
    import os

    return load_on_nodes(directories[int(os.environ["RANK"]) // ranks_per_node], tp, ranks_per_node, options)


def groups_in_turn(directory: str, tp: int, times: int) -> None:
    """Makes ``times`` process groups one after another in this process, as a server reloading
    weights does: each round a ``keep_group`` load, ``close()``, then a load that raises
    MissingWeightsError (which closes its group too). Raises on the first round that fails."""
    import torch.distributed as dist

    skip = distload.LoadConfig(tp=tp, device="cpu", skip_units={0: ("model.norm.weight",)})
    for round_ in range(times):
        with distload.load(directory, distload.LoadConfig(tp=tp, device="cpu"), keep_group=True):
            assert dist.is_initialized(), round_
        assert not dist.is_initialized(), round_
        try:
            distload.load(directory, skip, keep_group=True)
        except distload.MissingWeightsError:
            pass
        else:
            raise AssertionError(f"round {round_}: a load skipping model.norm.weight passed")
