"""--dry-run: the whole plan and the coverage analysis from headers alone, for any world size.

No process group and no tensor data: every rank's reads are planned on this one
machine (once per class of equivalent ranks), and a unit counts as loaded exactly
when its tensor is in the checkpoint, which is what a real load of a sound
checkpoint would record. CI machines without the GPUs use it as an offline check.
"""

from __future__ import annotations

import time

from . import tracking
from .comm import Collectives
from .config import LoadConfig
from .models import ModelBuilder, reference_model
from .report import LoadReport, RankStats
from .spec import Role


def dry_run(checkpoint: str, config: LoadConfig = LoadConfig(), *, world_size: int = 1,
            build: ModelBuilder = reference_model) -> LoadReport:
    """Plans a load of ``checkpoint`` on ``world_size`` ranks and reports what it would find.

    Returns:
        A ``LoadReport`` with ``mode == "dry-run"``: planned bytes instead of measured ones, one
        row per class of ranks that read alike (``num_ranks`` of them, from ``rank`` on, sharing
        ``coords``), and missing / defaulted / unexpected from the headers.

    Example:
        >>> import distload
        >>> r = dry_run(distload.example_checkpoint(), LoadConfig(tp=2), world_size=8)
        >>> r.mode, r.complete, [(c.rank, c.num_ranks) for c in r.ranks]  # one row per TP index
        ('dry-run', True, [(0, 4), (1, 4)])
    """
    from .api import load_notes
    from .prepare import prepare

    start = time.perf_counter()
    layout = config.layout(world_size)
    # the unit table does not depend on the rank; the collectives are never called
    ckpt, _, _, plan = prepare(checkpoint, config, layout, build, rank=0, ops=Collectives(None, layout.tp),
                               stage_ops=Collectives(None, layout.tp * layout.dp))
    # one row per class of ranks that read alike: the report grows with tp x pp x ep, not the world
    classes = []
    for rank, count in layout.rank_classes():
        s = plan.summary(rank)
        group, shard = layout.expert_coords(rank)
        c = layout.coords(rank)
        classes.append(RankStats(rank=rank, units_loaded=s.units_present, units_owned=s.units_owned,
                                 units_not_loaded=s.units_owned - s.units_present, bytes_read=s.nbytes,
                                 seconds=0.0, files_opened=s.files, num_ranks=count,
                                 coords=(("tp", c.tp), ("pp", c.pp), ("expert_group", group),
                                         ("expert_shard", shard))))
    findings = None
    if config.track_enabled:
        absent = [u for u, unit in enumerate(plan.units) if unit.name not in plan.tensors]
        verdict = tracking.Verdict(failed=tuple(u for u in absent if plan.units[u].role is not Role.OPTIONAL),
                                   defaulted=tuple(u for u in absent if plan.units[u].role is Role.OPTIONAL),
                                   mismatched=())
        findings = tracking.findings(plan, verdict, None)
    return LoadReport(mode="dry-run", checkpoint=ckpt.directory, layout=layout.to_dict(),
                      tracked=config.track_enabled, num_units=len(plan.units), findings=findings,
                      unexpected=plan.unexpected, ignored=plan.ignored, ignored_rules=plan.ignore_rules,
                      ranks=tuple(classes),
                      notes=load_notes(ckpt, config),
                      seconds=time.perf_counter() - start, strict=config.strict,
                      extra={"planned_rank_classes": len(classes)})
