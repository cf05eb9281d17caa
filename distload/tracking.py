"""PURE merge of per-rank load records into missing / inconsistent / defaulted / mismatched.

Each rank turns what it filled into a count vector over the canonical unit table
(``record``); ``comm`` sums the vectors once; ``classify`` compares each sum with
the number of owners the layout gives the unit. Only when something failed does a
second, small exchange (the failed units' flags from every rank) name ``loaded_by``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .plan import Plan
from .spec import Role


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """Unit indices by outcome, from the summed counts alone."""

    failed: tuple[int, ...]
    """owned units that not every owner loaded (missing or inconsistent)"""
    defaulted: tuple[int, ...]
    """optional units no owner loaded"""
    mismatched: tuple[int, ...]
    """verify units some owner found different"""
    nonfinite: tuple[int, ...] = ()
    """units some owner found NaN or Inf in (only when scanned)"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """One report line, grouped by checkpoint tensor name."""

    name: str
    """checkpoint tensor name"""
    owners: tuple[int, ...]
    """ranks that own any of its units"""
    loaded_by: tuple[int, ...] = ()
    """owners that loaded their unit (inconsistent entries)"""
    affects: tuple[str, ...] = ()
    """derived parameters computed from it"""
    against: str = ""
    """what a verified tensor was compared with (mismatched entries)"""
    differs_on: tuple[int, ...] = ()
    """ranks whose piece differed (mismatched entries)"""
    found_on: tuple[int, ...] = ()
    """ranks whose loaded piece holds NaN or Inf (nonfinite entries)"""

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "owners": list(self.owners)}
        if self.loaded_by:
            out["loaded_by"] = list(self.loaded_by)
        if self.affects:
            out["affects"] = list(self.affects)
        if self.against:
            out["against"] = self.against
            out["differs_on"] = list(self.differs_on)
        if self.found_on:
            out["found_on"] = list(self.found_on)
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Findings:
    """The merged outcome of a load."""

    missing: tuple[Entry, ...]
    inconsistent: tuple[Entry, ...]
    defaulted: tuple[Entry, ...]
    mismatched: tuple[Entry, ...]
    nonfinite: tuple[Entry, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing and not self.inconsistent


def count_dtype(world_size: int) -> torch.dtype:
    """The smallest integer type every backend sums that holds a count up to ``world_size``
    (int8: a quarter of the bytes of int32 on the wire; NCCL has no int16)."""
    return torch.int8 if world_size <= 127 else torch.int32


def record(plan: Plan, loaded: Iterable[int], mismatched: Iterable[int] = (),
           nonfinite: Iterable[int] | None = None, *, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Returns this rank's 0/1 record over the unit table, then over its verify units.

    Layout: ``[U + V (+ U)]``: "loaded" per unit, then "found different" per verify
    unit (only verify units can mismatch, so this part is short), then, when a
    finiteness scan ran (``nonfinite`` given), "holds NaN/Inf" per unit. Summed over
    ranks it gives ``classify`` what it needs, in one collective.
    """
    n, v = len(plan.units), len(plan.verify_units)
    out = torch.zeros(n + v + (n if nonfinite is not None else 0), dtype=dtype)
    out[:n].index_fill_(0, _indices(loaded), 1)
    slot = {u: n + i for i, u in enumerate(plan.verify_units)}
    out.index_fill_(0, _indices(slot[u] for u in mismatched), 1)
    if nonfinite is not None:
        out[n + v:].index_fill_(0, _indices(nonfinite), 1)
    return out


def _indices(units: Iterable[int]) -> torch.Tensor:
    """Unit indices as an int64 tensor (through a C array: ~4x faster than from a list)."""
    buf = array("q", units)
    return torch.frombuffer(buf, dtype=torch.int64) if buf else torch.zeros(0, dtype=torch.int64)


def expected_counts(plan: Plan) -> torch.Tensor:
    """Returns the number of owners of each unit (what a complete load sums to)."""
    counts = plan.owner_counts
    if not len(counts):
        return torch.zeros(0, dtype=torch.int32)
    assert counts.itemsize == 4, "owner counts must be 32-bit C ints"
    return torch.frombuffer(counts, dtype=torch.int32).clone()


def classify(plan: Plan, totals: torch.Tensor) -> Verdict:
    """Compares summed records with the owners each unit has.

    Args:
        plan: the plan every rank shares.
        totals: the sum over ranks of ``record`` vectors.
    """
    n = len(plan.units)
    failed, defaulted = unit_outcomes(totals[:n], expected_counts(plan),
                                      lambda u: plan.units[u].role is Role.OPTIONAL)
    v = len(plan.verify_units)
    differs = totals[n:n + v].nonzero().flatten().tolist()
    return Verdict(failed=failed, defaulted=defaulted,
                   mismatched=tuple(plan.verify_units[i] for i in differs),
                   nonfinite=tuple(totals[n + v:].nonzero().flatten().tolist()))


def unit_outcomes(loaded: torch.Tensor, expected: torch.Tensor,
                  optional: Callable[[int], bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The one definition of a unit's outcome, shared by ``load`` and ``distload.track``.

    A unit is complete when every owner loaded it. An optional unit no owner loaded is
    *defaulted*; any other unit some owner did not load has *failed* (``failure_entries``
    tells missing from inconsistent, by checkpoint name).

    Args:
        loaded: per unit, how many owners loaded it (the summed records).
        expected: per unit, how many owners it has.
        optional: whether unit ``u`` is optional (asked only of units short of their owners).

    Returns:
        ``(failed, defaulted)`` unit indices, in table order.
    """
    loaded = loaded.to(torch.int32)
    assert bool((loaded <= expected).all()), "a rank recorded a unit it does not own"
    short = (loaded < expected).nonzero().flatten().tolist()
    defaulted = tuple(u for u in short if int(loaded[u]) == 0 and optional(u))
    skipped = set(defaulted)
    return tuple(u for u in short if u not in skipped), defaulted


@dataclass(frozen=True, kw_only=True, slots=True)
class NameFacts:
    """What the ranks did with one checkpoint tensor of which some unit failed."""

    name: str
    """checkpoint tensor name"""
    owners: tuple[int, ...]
    """ranks that own any of its units, in rank order"""
    loaded_by: tuple[int, ...]
    """owners that loaded every unit of it they own"""
    anything: bool
    """whether any rank loaded any unit of it"""
    affects: tuple[str, ...] = ()
    """derived parameters computed from it"""


def failure_entries(facts: Iterable[NameFacts]) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
    """The one definition of *missing* and *inconsistent*, shared by ``load`` and ``distload.track``.

    A checkpoint tensor with a failed unit is *missing* when no rank loaded any unit of it, and
    *inconsistent* when some did: then ``loaded_by`` names the owners that loaded all of theirs
    (a fused tensor's regions are several units on one rank: skipping ``k`` alone makes that
    rank fall out of ``loaded_by``).

    Returns:
        ``(missing, inconsistent)`` entries, in the order of ``facts``.
    """
    missing, inconsistent = [], []
    for f in facts:
        entry = Entry(name=f.name, owners=f.owners, loaded_by=f.loaded_by, affects=f.affects)
        (inconsistent if f.anything else missing).append(entry)
    return tuple(missing), tuple(inconsistent)


def exchange_rows(plan: Plan, verdict: Verdict, local: torch.Tensor) -> torch.Tensor:
    """Returns this rank's flags for the failed units, then the mismatched ones (to gather)."""
    n, v = len(plan.units), len(plan.verify_units)
    slot = {u: n + i for i, u in enumerate(plan.verify_units)}
    return torch.cat([local[list(verdict.failed)], local[[slot[u] for u in verdict.mismatched]],
                      local[[n + v + u for u in verdict.nonfinite]]])


def findings(plan: Plan, verdict: Verdict, rows: torch.Tensor | None) -> Findings:
    """Names the outcome, grouped by checkpoint tensor name.

    Args:
        rows: every rank's ``exchange_rows``, stacked ``[world, F]``; None when
            nothing failed or mismatched.
    """
    nfail, nmis = len(verdict.failed), len(verdict.mismatched)
    loaded_by = _flags_by_unit(verdict.failed, rows[:, :nfail] if rows is not None else None)
    mism_by = _flags_by_unit(verdict.mismatched, rows[:, nfail:nfail + nmis] if rows is not None else None)
    bad_by = _flags_by_unit(verdict.nonfinite, rows[:, nfail + nmis:] if rows is not None else None)
    affects: dict[str, list[str]] = {}
    for spec in plan.specs:
        for source in spec.derived_from:
            affects.setdefault(source, []).append(spec.name)

    units_of = _by_name(plan, range(len(plan.units)))
    facts = []
    for name, bad in _by_name(plan, verdict.failed).items():
        units = units_of[name]
        owners = _owners(plan, units)
        # an owner loaded the tensor when it loaded every unit it owns of it
        short = {r for u in bad for r in set(plan.owners(u)).difference(loaded_by[u])}
        facts.append(NameFacts(name=name, owners=owners, loaded_by=tuple(r for r in owners if r not in short),
                               anything=len(bad) < len(units) or any(loaded_by[u] for u in bad),
                               affects=tuple(affects.get(name, ()))))
    missing, inconsistent = failure_entries(facts)
    defaulted = [Entry(name=n, owners=_owners(plan, us), affects=tuple(affects.get(n, ())))
                 for n, us in _by_name(plan, verdict.defaulted).items()]
    unloaded = {e.name for e in (*missing, *inconsistent)}
    mismatched = []
    for name, units in _by_name(plan, verdict.mismatched).items():
        against = _derived_sources(plan, plan.units[units[0]].param)
        if unloaded.intersection(against):
            continue  # compared with memory its own missing source never filled: reported there
        mismatched.append(Entry(name=name, owners=_owners(plan, units_of[name]), against=", ".join(against),
                                differs_on=tuple(sorted({r for u in units for r in mism_by[u]}))))
    nonfinite = [Entry(name=name, owners=_owners(plan, units_of[name]),
                       found_on=tuple(sorted({r for u in units for r in bad_by[u]})))
                 for name, units in _by_name(plan, verdict.nonfinite).items()]
    return Findings(missing=missing, inconsistent=inconsistent,
                    defaulted=tuple(defaulted), mismatched=tuple(mismatched), nonfinite=tuple(nonfinite))


def _flags_by_unit(units: Sequence[int], rows: torch.Tensor | None) -> dict[int, tuple[int, ...]]:
    if rows is None:
        return {u: () for u in units}
    return {u: tuple(rows[:, i].nonzero().flatten().tolist()) for i, u in enumerate(units)}


def _by_name(plan: Plan, units: Iterable[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for u in units:
        out.setdefault(plan.units[u].name, []).append(u)
    return out


def _owners(plan: Plan, units: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({r for u in units for r in plan.owners(u)}))


def _derived_sources(plan: Plan, param: str) -> tuple[str, ...]:
    return next((s.derived_from for s in plan.specs if s.name == param), ())
