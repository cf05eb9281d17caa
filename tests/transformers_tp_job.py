"""Run under torchrun (gloo, CPU): transformers' own tensor-parallel loading of a checkpoint
(``from_pretrained(..., tp_plan="auto")``), tracked by ``distload.track`` at the granularity
transformers lets one observe without patching it, and what transformers itself reports.

transformers reads each checkpoint tensor's TP piece through safetensors' lazy slices, then fuses
the per-expert tensors of a layer into one parameter (``experts.gate_up_proj``) and writes that:
its writes are visible per fused parameter only, its reads per checkpoint tensor and piece. So each
rank declares, from transformers' published TP plan, the piece of every checkpoint tensor it
needs, and passes transformers a state dict of recording slices (``distload.track.read_slices``):
a piece counts as loaded when transformers read it.

    python -m torch.distributed.run --nproc-per-node N tests/transformers_tp_job.py CHECKPOINT OUT_DIR
writes OUT_DIR/rank{r}.json: distload's merged report and transformers' outcome on that rank.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys

import torch
import torch.distributed as dist

ROWS = {"colwise", "packed_colwise", "colwise_gather_output", "embedding_rowwise"}
"""TP styles of transformers' plan that split a weight's rows (the checkpoint tensor's dim 0)"""
COLUMNS = {"rowwise"}
"""styles that split its input features (the checkpoint tensor's last dim)"""


def style_of(param: str, plan: dict) -> str | None:
    """The style transformers' resolved plan gives a parameter (by its own name, or its module's)."""
    module = param.rpartition(".")[0]
    for pattern, style in plan.items():
        rx = re.escape(pattern).replace(r"\*", r"\d+")
        if re.fullmatch(rx, param) or re.fullmatch(rx, module):
            return style
    return None


def expectations(model, rank: int, tp: int):
    """Every checkpoint tensor's piece this rank needs, read from the model transformers builds (its
    parameters, its resolved ``tp_plan``) and from transformers' checkpoint conversion mapping (which
    per-expert checkpoint tensors it fuses into one parameter)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from distload import track

    plan = model.tp_plan
    fused = [(t, c.source_patterns) for c in get_checkpoint_conversion_mapping(model.config.model_type) or ()
             if hasattr(c, "source_patterns") for t in c.target_patterns]
    exp = track.Expectations()
    for param, tensor in model.named_parameters():
        style = style_of(param, plan)
        target = next(((t, sources) for t, sources in fused if param.endswith(t)), None)
        if target is None:
            names, ndim = [param], tensor.dim()
        else:  # one checkpoint tensor per expert (dim 0 of the fused parameter) and source
            t, sources = target
            names = [param.replace(t, s.replace("*", str(e))) for s in sources for e in range(tensor.shape[0])]
            ndim = tensor.dim() - 1
        dim = 0 if style in ROWS and ndim else (ndim - 1 if style in COLUMNS and ndim else None)
        for name in names:
            exp.expect(track.Key.of(name, dim=dim, index=rank if dim is not None else 0,
                                    num_shards=tp if dim is not None else 1), param=param)
    return exp


def main(directory: str, out: str) -> None:
    import transformers
    from distload import track
    from distload.layout import Layout

    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        expected = expectations(cls(config), rank, tp)
    recorder = track.Recorder(expected, {})
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("transformers").addHandler(handler)
    outcome: dict = {}
    try:
        _, info = cls.from_pretrained(None, config=config, state_dict=track.read_slices(directory, recorder),
                                      tp_plan="auto", dtype=torch.float32, output_loading_info=True)
        outcome = {"raised": None, "missing_keys": sorted(info["missing_keys"])}
    except RuntimeError as err:
        outcome = {"raised": f"{type(err).__name__}: {err}"}
    logging.getLogger("transformers").removeHandler(handler)
    outcome["report_lines"] = [line.strip() for line in log.getvalue().splitlines()
                               if "| MISSING" in line or "| CONVERSION" in line]
    report = track.merge(expected, recorder, checkpoint=directory, layout=Layout(world_size=tp, tp=tp))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"report": report.to_json(), "transformers": outcome, "text": report.format_text()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
