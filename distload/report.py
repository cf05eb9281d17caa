"""LoadReport: the merged outcome of a load, as readable text and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._version import __version__
from .tracking import Entry, Findings

if TYPE_CHECKING:
    from .verify import Verification

SCHEMA_VERSION = 3
"""the JSON report's format: 2 added rank_classes (dry runs), exit verdicts and these two keys; 3 added
the unread statuses and ``seen_on`` to ``verification.files`` (a status other than ``verified`` need not fail)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankStats:
    """What one rank did."""

    rank: int
    """global rank"""
    units_loaded: int
    """units this rank filled (verified units included)"""
    units_owned: int
    """units this rank owns (whether or not the checkpoint has them)"""
    units_not_loaded: int
    """owned units this rank did not fill (absent from the checkpoint, skipped, defaulted)"""
    bytes_read: int
    """bytes requested from the checkpoint files (planned bytes in a dry run)"""
    seconds: float
    """time spent reading and filling"""
    files_opened: int
    """checkpoint files whose data this rank read"""
    staging_bytes: int = 0
    """host staging memory this rank allocated for reads (pinned on CUDA)"""
    merge_seconds: float = 0.0
    """time this rank spent in the tracking merge (its collectives and classification)"""
    bytes_hashed: int = 0
    """bytes this rank hashed under --verify-checksums (its node's share of the files, read whole)"""
    hash_seconds: float = 0.0
    """this rank's hashing, beside its reads: from its start to the end of its last file"""
    num_ranks: int = 1
    """ranks this row stands for: 1 in a load; in a dry run, the ranks of one class (``rank``
    is the first), which read alike"""
    coords: tuple[tuple[str, int], ...] = ()
    """a dry run's class: the coordinates its ranks share (tp, pp, expert group and shard)"""

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"rank": self.rank, "units_loaded": self.units_loaded, "units_owned": self.units_owned,
                "units_not_loaded": self.units_not_loaded, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 6), "gbps": round(self.gbps, 3),
                "files_opened": self.files_opened, "staging_bytes": self.staging_bytes,
                "merge_seconds": round(self.merge_seconds, 6), "bytes_hashed": self.bytes_hashed,
                "hash_seconds": round(self.hash_seconds, 6),
                **({"num_ranks": self.num_ranks, **dict(self.coords)} if self.coords else {})}


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """The outcome of one load, the same on every rank.

    ``complete`` is True when the records were merged and no unit is missing or inconsistent (and
    no file failed content verification), None when tracking was turned off (nothing was proven);
    ``ok`` is True when no check that ran failed, so it is True under tracking off too.
    """

    mode: str
    """``load``, ``dry-run``, or ``track`` (``distload.track.merge``: an engine's own load)"""
    checkpoint: str
    """checkpoint directory"""
    layout: dict
    """world_size, tp, dp, pp"""
    tracked: bool
    """whether tracking ran"""
    num_units: int
    """units in the canonical table"""
    findings: Findings | None
    """merged outcome; None when not tracked"""
    unexpected: tuple[str, ...] = ()
    """checkpoint tensors no rank consumed"""
    ignored: tuple[str, ...] = ()
    """checkpoint tensors skipped by an ignore rule"""
    ignored_rules: tuple[str, ...] = ()
    """the rule (regex) that ignored each of ``ignored``, in the same order"""
    notes: tuple[str, ...] = ()
    """remarks such as dtype casts"""
    ranks: tuple[RankStats, ...] = ()
    """per-rank statistics, in rank order"""
    seconds: float = 0.0
    """wall time of the whole load on rank 0"""
    strict: bool = False
    """whether unexpected tensors fail the load"""
    extra: dict = field(default_factory=dict)
    """further top-level JSON fields"""
    verification: "Verification | None" = None
    """content verification (--verify-checksums): the files checked, against what; None when not asked"""

    @property
    def complete(self) -> bool | None:
        if self.verification is not None and not self.verification.ok:  # bytes that are not the published ones
            return False
        return self.findings.complete if self.findings is not None else None

    @property
    def ok(self) -> bool:
        """True when the load may be used: complete (or untracked), every checked file equal to its
        reference, and no unexpected tensor under strict."""
        if self.verification is not None and not self.verification.ok:
            return False
        if self.findings is not None and (not self.findings.complete or self.findings.mismatched):
            return False
        return not (self.strict and (self.unexpected or self._entries("nonfinite")))

    def stats_of(self, rank: int) -> RankStats:
        """What ``rank`` read (a load), or would read (a dry run: the row of its class of ranks).

        Example:
            >>> import distload
            >>> from distload.dryrun import dry_run
            >>> dry_run(distload.example_checkpoint(), distload.LoadConfig(tp=2), world_size=8).stats_of(5).rank
            1
        """
        if not any(r.coords for r in self.ranks):
            return self.ranks[rank]
        from .layout import Layout
        lay = Layout(**self.layout)
        c = lay.coords(rank)
        group, shard = lay.expert_coords(rank)
        want = (("tp", c.tp), ("pp", c.pp), ("expert_group", group), ("expert_shard", shard))
        return next(r for r in self.ranks if r.coords == want)

    def _rules(self) -> tuple[str, ...]:
        """``ignored_rules``, or empty rules where a report was made without them."""
        return self.ignored_rules if len(self.ignored_rules) == len(self.ignored) else ("",) * len(self.ignored)

    def _entries(self, kind: str) -> tuple[Entry, ...]:
        return getattr(self.findings, kind) if self.findings is not None else ()

    def to_json(self) -> dict:
        """Returns the public JSON form (keys documented in the README)."""
        bytes_read = sum(r.bytes_read * r.num_ranks for r in self.ranks)
        rows = "rank_classes" if self.mode == "dry-run" else "ranks"
        return {
            "schema_version": SCHEMA_VERSION, "distload_version": __version__,
            "complete": self.complete, "ok": self.ok, "mode": self.mode, "tracked": self.tracked,
            "checkpoint": self.checkpoint, "layout": dict(self.layout), "num_units": self.num_units,
            "missing": [e.to_json() for e in self._entries("missing")],
            "inconsistent": [e.to_json() for e in self._entries("inconsistent")],
            "unexpected": [{"name": n} for n in self.unexpected],
            "defaulted": [e.to_json() for e in self._entries("defaulted")],
            "mismatched": [e.to_json() for e in self._entries("mismatched")],
            "nonfinite": [e.to_json() for e in self._entries("nonfinite")],
            "ignored": [{"name": n, **({"rule": r} if r else {})}
                        for n, r in zip(self.ignored, self._rules())],
            "notes": list(self.notes),
            "bytes_read": bytes_read,
            "verification": self.verification.to_json() if self.verification is not None else None,
            rows: [r.to_json() for r in self.ranks],
            "seconds": round(self.seconds, 6),
            **self.extra,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def format_text(self, *, limit: int = 20) -> str:
        """Returns a human-readable summary (at most ``limit`` names per list)."""
        lay = self.layout
        status = {True: "COMPLETE", False: "INCOMPLETE", None: "NOT TRACKED"}[self.complete]
        if self.complete and not self.ok:  # every unit loaded, but a check failed (see below)
            status += ", FAILED CHECKS"
        total = sum(r.bytes_read * r.num_ranks for r in self.ranks)
        slowest = max((r.seconds for r in self.ranks), default=0.0)
        num_ranks = sum(r.num_ranks for r in self.ranks)
        lines = [f"distload {self.mode}: {status} - {self.checkpoint}",
                 f"  layout: world {lay['world_size']} (tp {lay['tp']}, dp {lay['dp']}, pp {lay['pp']}, "
                 f"ep {lay.get('ep', 1)}); "
                 f"{self.num_units} units",
                 f"  read: {_size(total)} over {num_ranks} rank(s); load took {self.seconds:.2f} s on rank 0 "
                 f"(wall time), the slowest rank's read step {slowest:.2f} s" if self.mode == "load" else
                 f"  recorded: {_size(total)} written into parameters over {num_ranks} rank(s), observed for "
                 f"{self.seconds:.2f} s on rank 0" if self.mode == "track" else
                 f"  planned: {_size(total)} over {num_ranks} rank(s) in {len(self.ranks)} class(es) of ranks "
                 f"that read alike, planned in {self.seconds:.2f} s"]
        if not self.tracked:  # said plainly: a CI gate on ok alone would pass such a run
            lines.insert(1, "  not tracked (--track off / enable_weights_track false): nothing proves that every "
                            "tensor was loaded; ok only says that no check that ran failed")
        if self.ranks:
            lo, mid, hi = _spread(self.ranks, "bytes_read")
            lines.append(f"  bytes per rank: min {_size(lo)}, median {_size(mid)}, max {_size(hi)}")
            for what, attr in (("units", "units_owned"), ("files", "files_opened")):
                lo, mid, hi = _spread(self.ranks, attr)
                lines.append(f"  {what} per rank: min {lo}, median {mid}, max {hi}")
        for kind in ("missing", "inconsistent", "defaulted", "mismatched", "nonfinite"):
            entries = self._entries(kind)
            if entries:
                lines.append(f"  {kind} ({len(entries)}):")
                for e in entries[:limit]:
                    extra = f"; loaded by {_ranks(e.loaded_by)}" if kind == "inconsistent" else ""
                    extra += f"; affects {', '.join(e.affects)}" if e.affects else ""
                    extra += f"; differs from {e.against}" if e.against else ""
                    extra += f"; NaN/Inf on {_ranks(e.found_on)}" if e.found_on else ""
                    lines.append(f"    {e.name}  (owner ranks {_ranks(e.owners)}{extra})")
                if len(entries) > limit:
                    lines.append(f"    ... and {len(entries) - limit} more (see --json)")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}){' - fails under --strict' if self.strict else ''}:")
            lines += [f"    {n}" for n in self.unexpected[:limit]]
            if len(self.unexpected) > limit:
                lines.append(f"    ... and {len(self.unexpected) - limit} more (see --json)")
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)}), by an ignore rule:")
            lines += [f"    {n}  (rule {r})" if r else f"    {n}" for n, r in zip(self.ignored[:limit], self._rules())]
            if len(self.ignored) > limit:
                lines.append(f"    ... and {len(self.ignored) - limit} more (see --json)")
        if self.verification is not None:
            lines += self.verification.text_lines(limit=limit, size=_size,
                                                  slowest_seconds=max((r.hash_seconds for r in self.ranks), default=0))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _spread(rows: tuple[RankStats, ...], attr: str) -> tuple[int, int, int]:
    """Min, median and max of ``attr`` over ranks, each row counting for its ``num_ranks``."""
    values = sorted((getattr(r, attr), r.num_ranks) for r in rows)
    middle, seen = sum(n for _, n in values) // 2, 0
    for value, n in values:
        seen += n
        if seen > middle:
            return values[0][0], value, values[-1][0]
    raise AssertionError("no ranks")


def _ranks(ranks: tuple[int, ...]) -> str:
    """Compresses rank lists: (0, 1, 2, 3, 6) -> '0-3,6'."""
    if not ranks:
        return "none"
    out, start, prev = [], ranks[0], ranks[0]
    for r in (*ranks[1:], None):
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if r is not None:
            start = prev = r
    return ",".join(out)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
