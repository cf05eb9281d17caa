"""load(): one entry point wiring layout, model, plan, execute, tracking and comm."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import tracking, verify
from ._version import __version__
from .checkpoint.directory import Checkpoint
from .checkpoint.reference import Checks, load_checks
from .comm import Comm, WorldInfo, world_from_env
from .config import LoadConfig
from .errors import DistloadError, MissingWeightsError, PeerFailedError
from .execute import ExecResult, Executor
from .layout import Layout
from .models import ModelBuilder, model_notes, reference_model
from .fingerprint import Fingerprint, disagreement, fingerprint, from_words, to_words
from .plan import Plan, RankPlan
from .prepare import materialize, prepare, tensors_at
from .readahead import window_for
from .quant import quant_config
from .quant.apply import process_after_loading
from .report import LoadReport, RankStats
from .rules import rules_note


@dataclass(frozen=True, kw_only=True, slots=True)
class Loaded:
    """What ``load`` returns: this rank's model and the job's report."""

    model: nn.Module
    """this rank's shard of the model, filled"""
    report: LoadReport
    """the merged report (the same on every rank)"""
    layout: Layout
    """the layout used"""
    rank: int
    """this rank"""
    comm: Comm | None = None
    """the job's process group, held open for the model's collectives when ``load`` was
    called with ``keep_group=True`` (release it with ``close()``); None otherwise"""

    def close(self) -> None:
        """Releases the process group that ``keep_group=True`` kept open (a no-op otherwise).

        A group that existed before ``load`` belongs to the caller and is left alone.
        """
        if self.comm is not None:
            self.comm.close()

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(checkpoint: str, config: LoadConfig = LoadConfig(), *, world: WorldInfo | None = None,
         progress: Callable[[int, int], None] | None = None,
         build: ModelBuilder = reference_model, keep_group: bool = False) -> Loaded:
    """Loads ``checkpoint`` into this rank's shard of its reference model and proves it complete.

    Call it on every rank (under torchrun, the rank and world come from the
    environment). Tracking merges every rank's record once; a missing or
    inconsistent unit raises ``MissingWeightsError`` on every rank.

    Args:
        checkpoint: a Hugging Face checkpoint directory (config.json + safetensors).
        config: layout, device, dtype and tracking options.
        world: rank and world size; default: torchrun's environment variables.
        progress: called as ``progress(bytes_done, bytes_total)`` while this rank reads.
        build: makes this rank's model on the meta device from a ``BuildContext``;
            default: the reference model for the config's ``model_type``. Pass your
            own to load into a module built from distload's layers (see README).
        keep_group: keep the process group that ``load`` created (and the TP groups the
            model's forward runs its collectives on) open after returning; call
            ``Loaded.close()``, or use ``Loaded`` as a context manager, when done. Without
            it the group is destroyed before returning, so a model with ``tp > 1`` cannot
            run forward.

    Returns:
        ``Loaded`` with ``.model`` and ``.report`` (and ``.comm`` under ``keep_group``).

    Example:
        >>> import distload
        >>> loaded = distload.load(distload.example_checkpoint(), distload.LoadConfig(device="cpu"))
        >>> loaded.report.complete
        True
    """
    with _collector_paused():
        return _connect_and_load(checkpoint, config, world or world_from_env(), progress, build, keep_group)


@contextlib.contextmanager
def _collector_paused():
    """Pauses Python's cyclic garbage collector during a load: with torch imported, its full
    passes over every live object cost more than planning itself (a load makes few cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _connect_and_load(checkpoint: str, config: LoadConfig, world: WorldInfo,
                      progress: Callable[[int, int], None] | None, build: ModelBuilder,
                      keep_group: bool) -> Loaded:
    device = _device(config, world)
    comm = Comm.connect(world, device=device)
    try:
        loaded = _load(checkpoint, config, comm, device, progress, build, local_ranks=world.local_world_size,
                       local_rank=world.local_rank)
    except BaseException:
        comm.close()
        raise
    if keep_group:
        return dataclasses.replace(loaded, comm=comm)
    comm.close()
    return loaded


def _load(directory: str, config: LoadConfig, comm: Comm, device: torch.device,
          progress: Callable[[int, int], None] | None, build: ModelBuilder, *, local_ranks: int,
          local_rank: int = 0) -> Loaded:
    start = time.perf_counter()
    rank = comm.rank
    hashing = verify.Hashing()
    comm.start_watch(dead_after=config.failure_timeout)
    try:  # everything a single rank can fail at is published to the others
        layout = config.layout(comm.world_size)
        ops = comm.tp_collectives(layout)  # bound to its subgroup once the ranks agree
        ckpt, model, specs, plan = prepare(directory, config, layout, build, rank=rank, ops=ops,
                                           stage_ops=comm.stage_collectives(layout))
        checks = load_checks(ckpt) if config.verify_enabled else None  # the reference, before any read
        # this rank's share of the files is hashed on threads of its own beside the rest of the load
        hashing = verify.Hashing(checks, local_rank=local_rank, local_ranks=local_ranks,
                                 num_threads=config.read_threads(local_ranks)).start()
        _agree(comm, fingerprint(ckpt, layout, specs, __version__, _record_shape(config, checks)))
        comm.create_groups(layout)
        rank_plan = plan.for_rank(rank)
        model = materialize(model, device, huge_pages=config.huge_pages)
        own_stage = layout.coords(rank).pp
        params = tensors_at(model, (spec.name for spec in plan.specs if spec.stage == own_stage))
        skip_names = set(config.skip_units.get(rank, ()))
        skip = frozenset(r.unit for r in rank_plan.reads  # a name, or one region of it: name[label]
                         if r.tensor.name in skip_names or plan.units[r.unit].label in skip_names)
        threads = config.read_threads(local_ranks, cuda=device.type == "cuda")
        result = Executor(device=device, num_threads=threads,
                          staging_bytes=config.staging_bytes, check_finite=config.check_finite,
                          readahead_bytes=window_for(local_ranks) if config.readahead else 0).run(
            rank_plan, params, skip=skip, progress=progress, abort_check=comm.check_peers)
        hashed = hashing.results(abort_check=comm.check_peers)
        report = _merge(comm, config, layout, ckpt, plan, rank_plan, result, start,
                        after_merge=lambda: process_after_loading(model), checks=checks, hashed=hashed)
    except PeerFailedError:
        comm.peer_failed()
        raise
    except DistloadError as err:
        comm.publish_failure(err.with_rank(rank))
        raise
    except BaseException as err:  # a bug or an interrupt: peers must not wait for this rank
        comm.publish_failure(DistloadError(f"{type(err).__name__}: {err}", rank=rank))
        raise
    finally:
        hashing.stop()
        comm.stop_watch()
    if not report.ok:
        raise MissingWeightsError(_failure_summary(report), report=report, rank=rank)
    return Loaded(model=model, report=report, layout=layout, rank=rank)


def _record_shape(config: LoadConfig, checks: Checks | None = None) -> dict:
    """The options that change what the ranks exchange: they must agree on them too."""
    return {"track": config.track_enabled, "check_finite": config.check_finite, "strict": config.strict,
            "ignore": list(config.ignore), "quantize": config.quantize, "kv_cache_dtype": config.kv_cache_dtype,
            "verify": None if checks is None else checks.shape()}


def _agree(comm: Comm, mine: Fingerprint) -> None:
    """Compares every rank's fingerprint before any tensor data is read.

    Raises:
        DistloadError: naming the ranks that differ from rank 0 and in what.
    """
    if comm.world_size == 1:
        return
    rows = comm.gather_rows(torch.tensor(to_words(mine), dtype=torch.int64))
    err = disagreement([from_words(r.tolist()) for r in rows], rank=comm.rank)
    if err is not None:
        raise err


def _merge(comm: Comm, config: LoadConfig, layout: Layout, ckpt: Checkpoint, plan: Plan, rank_plan: RankPlan,
           result: ExecResult, start: float, after_merge: Callable[[], None], checks: Checks | None = None,
           hashed: verify.Hashed | None = None) -> LoadReport:
    """Combines every rank's record (one collective, plus one when something failed) into the report.

    ``after_merge`` (post-load work: derived parameters) runs only when the merged report says the
    load may be used, and before the last collective (the per-rank statistics): a rank that fails
    in it has published why before any other rank can leave ``load``.
    """
    findings = None
    merge_start = time.perf_counter()
    if config.track_enabled:
        local = tracking.record(plan, result.loaded, result.mismatched,
                                result.nonfinite if config.check_finite else None,
                                dtype=tracking.count_dtype(layout.world_size))
        verdict = tracking.classify(plan, comm.sum_counts(local))
        rows = None
        if verdict.failed or verdict.mismatched or verdict.nonfinite:  # a second, small exchange names the ranks
            rows = comm.gather_rows(tracking.exchange_rows(plan, verdict, local))
        findings = tracking.findings(plan, verdict, rows)
    merge_seconds = time.perf_counter() - merge_start
    verification = verify.merge(comm, checks, hashed) if checks is not None and hashed is not None else None
    notes = tuple(f"cast {c} while loading (model dtype differs from the checkpoint's)" for c in result.casts)
    notes += load_notes(ckpt, config)
    notes += verification.notes() if verification is not None else ()
    report = LoadReport(mode="load", checkpoint=ckpt.directory, layout=layout.to_dict(),
                        tracked=config.track_enabled, num_units=len(plan.units), findings=findings,
                        unexpected=plan.unexpected, ignored=plan.ignored, ignored_rules=plan.ignore_rules,
                        notes=notes, ranks=(),
                        seconds=0.0, strict=config.strict, verification=verification)
    if report.ok:
        after_merge()
    not_loaded = len(set(rank_plan.owned) - set(result.loaded))
    stats = comm.gather_rows(torch.tensor([len(result.loaded), len(rank_plan.owned), not_loaded,
                                           result.bytes_read, result.seconds, result.files_opened,
                                           result.staging_bytes, merge_seconds,
                                           hashed.bytes_hashed if hashed else 0, hashed.seconds if hashed else 0.0],
                                          dtype=torch.float64))
    ranks = tuple(RankStats(rank=r, units_loaded=int(s[0]), units_owned=int(s[1]), units_not_loaded=int(s[2]),
                            bytes_read=int(s[3]), seconds=float(s[4]), files_opened=int(s[5]),
                            staging_bytes=int(s[6]), merge_seconds=float(s[7]), bytes_hashed=int(s[8]),
                            hash_seconds=float(s[9]))
                  for r, s in enumerate(stats.tolist()))
    return dataclasses.replace(report, ranks=ranks, seconds=time.perf_counter() - start)


def load_notes(ckpt: Checkpoint, config: LoadConfig) -> tuple[str, ...]:
    """Report notes on the model loaded (which part of a multimodal checkpoint, or rules mode) and its
    quantization."""
    if config.rules is not None:
        return (rules_note(config),)
    return model_notes(ckpt.config, ckpt.tensors) + quant_notes(ckpt, config)


def quant_notes(ckpt: Checkpoint, config: LoadConfig) -> tuple[str, ...]:
    """Report notes naming the quantization scheme and the KV-cache dtype, when there are any."""
    quant = quant_config(ckpt.config, quantize=config.quantize, kv_cache_dtype=config.kv_cache_dtype)
    notes = (f"quantization: {quant.description}",) if quant.description else ()
    return notes + (("kv cache: fp8 (k_scale / v_scale optional, default 1.0)",) if quant.kv_cache_fp8 else ())


def _failure_summary(report: LoadReport) -> str:
    parts = []
    f = report.findings
    if f is not None:
        for kind in ("missing", "inconsistent", "mismatched"):
            entries = getattr(f, kind)
            if entries:
                parts.append(f"{len(entries)} {kind} ({_first_names(entries)})")
    if report.strict and report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected under --strict")
    if report.strict and f is not None and f.nonfinite:
        parts.append(f"{len(f.nonfinite)} with NaN/Inf under --strict")
    failed = report.verification.failed if report.verification is not None else ()
    if failed:
        parts.append(f"{len(failed)} file{'s' if len(failed) > 1 else ''} failed verification "
                     f"({_first_names(failed)})")
    return "load not usable: " + "; ".join(parts)


def _first_names(entries) -> str:
    return ", ".join(e.name for e in entries[:3]) + (" ..." if len(entries) > 3 else "")


def _device(config: LoadConfig, world: WorldInfo) -> torch.device:
    kind = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistloadError("--device cuda was asked for, but CUDA is not available", rank=world.rank)
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
