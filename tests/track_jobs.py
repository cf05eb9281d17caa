"""Functions the ``distload.track`` tests run on every rank (importable by pool workers): the
engine-style loader of ``tests.engine_loader`` with the lines an engine adds, and distload's own
``load`` of the same checkpoint and layout."""

from __future__ import annotations

import distload
from distload import track
from distload.layout import Layout


def engine_track(directory: str, layout: dict, skip: dict | None = None, redundant: int = 0,
                 extra_config: dict | None = None, world: distload.WorldInfo | None = None) -> dict:
    """Loads ``directory`` with the engine-style model on this rank (rank ``r`` leaving out the
    checkpoint tensors ``skip[r]``, as a loader that forgets them would) and merges with
    ``distload.track``; returns the report JSON and the set of names ``load_weights`` returned.

    Without ``world`` (torchrun's variables) the engine forms its own group first, and the merge
    uses it; with ``world`` (a Ray actor's, from ``distload.ray.rendezvous``) the merge forms it."""
    import torch.distributed as dist

    from tests.engine_loader import EngineModel, Place, STACKED, engine_config, safetensors_weights

    if world is None:
        world = distload.comm.world_from_env()
        if world.world_size > 1:
            dist.init_process_group("gloo")
    try:
        model = EngineModel(engine_config(directory), Place(rank=world.rank, **layout), redundant=redundant)
        dropped = set((skip or {}).get(world.rank, ()))
        weights = ((n, t) for n, t in safetensors_weights(directory) if n not in dropped)
        # ---- the lines an engine adds (the README's recipe, checked by tests/test_track_readme.py)
        params = dict(model.named_parameters())
        expected = track.from_engine(
            params, piece_of=lambda p, name, shard_id: params[p].piece(name, shard_id), stacked=STACKED,
            experts=model.expert_params_mapping, expert_maps=model.expert_maps,
            is_pp_missing=model.is_pp_missing_parameter,
            checkpoint_name=lambda p: p.replace(".attn.k_scale", ".k_scale").replace(".attn.v_scale", ".v_scale"),
            optional={r"\.attn\.[kv]_scale$": 1.0})
        recorder = track.Recorder(expected, model, enabled=track.enabled(extra_config))
        with recorder.observe():
            returned = model.load_weights(recorder.weights(weights))
        report = track.merge(expected, recorder, checkpoint=directory, extra_config=extra_config,
                             layout=Layout(world_size=world.world_size, **layout), world=world)
        # ----
        return {"report": report.to_json(), "returned": sorted(returned), "text": report.format_text()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def distload_report(directory: str, layout: dict, skip: dict | None = None, redundant: int = 0) -> dict:
    """``distload.load`` of the same checkpoint and layout (rank ``r`` skipping ``skip[r]``); its report JSON."""
    skip = {int(r): tuple(n) for r, n in (skip or {}).items()}
    config = distload.LoadConfig(device="cpu", redundant_experts=redundant, skip_units=skip, **layout)
    try:
        loaded = distload.load(directory, config)
    except distload.MissingWeightsError as err:
        return {"report": err.report.to_json()}
    return {"report": loaded.report.to_json()}
