"""Functions the MoE tests run on every rank (importable by pool workers)."""

from __future__ import annotations

import distload


def load_forward_route(directory: str, options: dict, input_ids, device: str = "cpu") -> dict:
    """Loads with ``LoadConfig(device=device, **options)`` (``cuda``: this rank's GPU, with NCCL)
    and the group kept open, runs the model
    on ``input_ids`` and returns the report JSON, this rank's parameters (numpy), its logits
    (None before the last stage) and, per sparse layer, what its router actually computed in
    that forward: ``routes[layer] = (experts [M, k], weights [M, k])`` over the M tokens it
    routed (this rank's own with ep = 1; every rank of the stage's, in stage rank order, with
    ep > 1)."""
    import torch

    from distload.layers.moe import Router
    from distload.layers.packed_moe import TopKRouter
    from distload.models.deepseek import GroupedRouter
    from tests.jobs import numpy_state

    with distload.load(directory, distload.LoadConfig(device=device, **options), keep_group=True) as loaded:
        routes: dict[int, tuple] = {}
        hooks = []
        for name, module in loaded.model.named_modules():
            if isinstance(module, (Router, GroupedRouter, TopKRouter)):
                layer = int(name.split(".")[2])  # model.layers.<N>.<block>.gate (or .router)

                def keep(_mod, _args, out, layer=layer):
                    weights, experts = out
                    routes[layer] = (experts.cpu().numpy().copy(), weights.detach().float().cpu().numpy().copy())

                hooks.append(module.register_forward_hook(keep))
        with torch.no_grad():
            logits = loaded.model(input_ids.to(device))
        for h in hooks:
            h.remove()
        return {"report": loaded.report.to_json(), "state": numpy_state(loaded.model), "routes": routes,
                "logits": None if logits is None else logits.cpu().numpy().copy()}


def load_report(directory: str, options: dict, device: str = "cpu") -> dict:
    """Loads with ``LoadConfig(device=device, **options)``; returns whether ``load`` raised
    MissingWeightsError and the report JSON."""
    try:
        loaded = distload.load(directory, distload.LoadConfig(device=device, **options))
    except distload.MissingWeightsError as err:
        return {"raised": True, "report": err.report.to_json()}
    return {"raised": False, "report": loaded.report.to_json()}
