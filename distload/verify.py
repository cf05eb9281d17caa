"""Content verification during a load (``--verify-checksums``): hashing beside the reads, one merge.

The ranks of a node split the files to check (``assign``: largest first, each to the local rank
with the fewest bytes so far), so the node reads every file whole once more, whatever its ranks
need of it. A rank hashes its share on threads of its own, started before the executor reads
and waited for after it. The verdicts meet in one integer all-reduce with a slot per file (as
tracking's units do); only when a file differs does a second, small exchange name the ranks that
hashed it. Weight files the load does not read are judged by each node in its own folder; the same
all-reduce tells whether every rank saw the same ones, and only when not are their lists gathered,
so each is named with the ranks that saw it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from threading import Event
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .checkpoint.digests import GIT_SHA1, file_digest
from .checkpoint.reference import (ABSENT, ABSENT_UNREAD, HUB_CACHE, PRESENT_UNREAD, UNLISTED, UNLISTED_UNREAD,
                                   UNREAD, Checks, FileCheck)
from .report import _ranks

if TYPE_CHECKING:
    from .comm import Comm

NOT_MINE, MATCHED, DIFFERS, SIZE_DIFFERS = 0, 1, 2, 3
"""a rank's outcome for one file: not hashed here, equal to the reference, different, or not read
because its size is not the manifest's"""

VERIFIED, DIFFERENT, UNHASHED, WRONG_SIZE = "verified", "differs", "unhashed", "size-differs"
"""a file's merged status (besides the manifest's ``absent`` and ``unlisted``, and ``UNREAD``)"""
FAILING = (DIFFERENT, WRONG_SIZE, ABSENT, UNLISTED, UNHASHED)
"""the statuses that fail the load (every status is ``VERIFIED``, one of these, or one of ``UNREAD``)"""

_WHY = {DIFFERENT: "its {algorithm} differs from the reference {expected}", UNHASHED: "hashed by no rank",
        WRONG_SIZE: "size differs: {size} bytes, the manifest says {expected_size}",
        ABSENT: "in the manifest, not in the folder", UNLISTED: "in the folder, not in the manifest",
        PRESENT_UNREAD: "in the manifest and the folder; not hashed", UNLISTED_UNREAD: "in the folder, not in the manifest",
        ABSENT_UNREAD: "in the manifest, not in the folder"}
_BY = {DIFFERENT: "hashed by", WRONG_SIZE: "seen by"}


def assign(sizes: Sequence[int], num_local: int) -> tuple[int, ...]:
    """The local rank that hashes each file: largest file first, each to the local rank with the
    fewest bytes so far (ties: the lowest), so every node's ranks hash about equal shares.

    Example:
        >>> assign([5, 3, 3, 1], 2)
        (0, 1, 1, 0)
    """
    load = [0] * num_local
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(num_local), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return tuple(owners)


@dataclass(frozen=True, kw_only=True, slots=True)
class Hashed:
    """What one rank's hashing found."""

    outcome: tuple[int, ...]
    """per file of the checks: NOT_MINE, MATCHED, DIFFERS or SIZE_DIFFERS"""
    bytes_hashed: int
    """bytes this rank read and hashed"""
    seconds: float
    """from the start of its hashing to the end of its last file"""


class Hashing:
    """This rank's share of the checks, hashed on its own threads while the load goes on.

    ``start`` starts the threads, ``results`` waits for them, and ``stop`` (call it in a ``finally``)
    stops and joins them. With ``checks`` None each is a no-op.
    """

    def __init__(self, checks: Checks | None = None, *, local_rank: int = 0, local_ranks: int = 1,
                 num_threads: int = 1) -> None:
        self._checks = checks
        self._local = (local_rank, max(1, local_ranks))
        self._num_threads = max(1, num_threads)
        self._stop = Event()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self._start = 0.0

    def start(self) -> "Hashing":
        """Starts hashing this rank's files, largest first; returns self."""
        if self._checks is None or self._pool is not None:
            return self
        files = self._checks.files
        local_rank, local_ranks = self._local
        owners = assign([f.size for f in files], local_ranks)
        # local ranks that do not fit the node's count (an odd launcher): hash everything, unsplit
        mine = [i for i, o in enumerate(owners) if o == local_rank or not 0 <= local_rank < local_ranks]
        self._start = time.perf_counter()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(mine), self._num_threads)),
                                        thread_name_prefix="distload-verify")
        for i in sorted(mine, key=lambda i: -files[i].size):
            self._futures[i] = self._pool.submit(self._hash, files[i])
        return self

    def _hash(self, check: FileCheck) -> tuple[int, int, float]:
        """(outcome, bytes hashed, when it ended); a file whose size the manifest contradicts is
        not read."""
        if check.expected_size is not None and check.size != check.expected_size:
            return SIZE_DIFFERS, 0, time.perf_counter()
        got = file_digest(check.path, check.algorithm, stop=self._stop)
        if got is None:  # stopped: the load failed, nothing is reported
            return DIFFERS, 0, time.perf_counter()
        return MATCHED if got[0] == check.expected else DIFFERS, got[1], time.perf_counter()

    def results(self, abort_check: Callable[[], None]) -> Hashed | None:
        """Waits for this rank's files (checking for failed peers meanwhile).

        Raises:
            CheckpointError: a file could not be read (names it).
            PeerFailedError: from ``abort_check``, while waiting.
        """
        if self._checks is None:
            return None
        outcome = [NOT_MINE] * len(self._checks.files)
        total, end = 0, self._start
        for i, future in self._futures.items():
            while True:
                try:
                    outcome[i], nbytes, ended = future.result(timeout=0.2)
                    break
                except (TimeoutError, concurrent.futures.TimeoutError):  # one class from 3.11 on
                    abort_check()
            total, end = total + nbytes, max(end, ended)
        return Hashed(outcome=tuple(outcome), bytes_hashed=total, seconds=end - self._start)

    def stop(self) -> None:
        """Stops the hashing (a file being hashed ends at its next chunk) and joins the threads."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class FileVerdict:
    """One checked file's merged outcome."""

    name: str
    """its path inside the checkpoint"""
    status: str
    """``verified``, ``differs``, ``size-differs``, ``unhashed``, ``absent``, ``unlisted``, or one of
    ``UNREAD`` (a file the load does not read: named, not verified, never failing)"""
    algorithm: str | None = None
    """``sha256`` or ``git-sha1``; None when it was not hashed (absent, unlisted, unread)"""
    expected: str | None = None
    """the reference digest"""
    hashes: int = 0
    """ranks that hashed it (one per node)"""
    failed_on: tuple[int, ...] = ()
    """ranks whose hash differed from the reference, or that found its size differs"""
    size: int | None = None
    """its size in bytes as this rank found it; None when absent"""
    expected_size: int | None = None
    """the size the manifest records; None for a cache blob"""
    seen_on: tuple[int, ...] | None = None
    """for an unread file, the ranks whose folder showed it so when not every rank's did; None: every rank"""

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "algorithm": self.algorithm, "expected": self.expected,
                "hashes": self.hashes, "failed_on": list(self.failed_on), "size": self.size,
                "expected_size": self.expected_size, "seen_on": None if self.seen_on is None else list(self.seen_on)}

    @property
    def label(self) -> str:
        """Its name, with the ranks that saw it when not all did."""
        return self.name if self.seen_on is None else f"{self.name} (rank{'s' if len(self.seen_on) > 1 else ''} " \
                                                      f"{_ranks(self.seen_on)} only)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """The job's content verification: which files were checked, against what, and how they fared."""

    reference: str
    """``huggingface-cache`` (blob names) or ``manifest``"""
    source: str
    """the cache's blobs folder, or the manifest file"""
    files: tuple[FileVerdict, ...]
    """every checked file, and every weight file the load does not read, by name"""
    bytes_hashed: int
    """bytes hashed by all ranks together"""

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> tuple[FileVerdict, ...]:
        return tuple(f for f in self.files if f.status in FAILING)

    @property
    def unread(self) -> tuple[FileVerdict, ...]:
        """The weight files the load does not read: named, not verified."""
        return tuple(f for f in self.files if f.status in UNREAD)

    def notes(self) -> tuple[str, ...]:
        """The report's note on the weight files this load does not read, when there are any."""
        there = [f.label for f in self.unread if f.status != ABSENT_UNREAD]
        gone = [f.label for f in self.unread if f.status == ABSENT_UNREAD]
        parts = []
        if there:
            parts.append(f"{_count(there, 'weight file')} in the folder {'was' if len(there) == 1 else 'were'} "
                         f"not read by this load and not verified: {_names(there)}")
        if gone:
            parts.append(f"{_count(gone, 'file')} the manifest lists {'is' if len(gone) == 1 else 'are'} gone: "
                         f"{_names(gone)}")
        return ("; ".join(parts),) if parts else ()

    def to_json(self) -> dict:
        return {"ok": self.ok, "reference": self.reference, "source": self.source,
                "bytes_hashed": self.bytes_hashed, "files": [f.to_json() for f in self.files]}

    def text_lines(self, *, limit: int, slowest_seconds: float, size: Callable[[float], str]) -> list[str]:
        """The human report's lines: what was checked and how, then each failure."""
        if self.reference == HUB_CACHE:
            how = (f"the Hugging Face cache's blob names in {self.source} (sha256"
                   + ("; git blob SHA-1 for small files)" if any(f.algorithm == GIT_SHA1 for f in self.files)
                      else ")"))
        else:
            how = f"the manifest {self.source} (sha256)"
        done = sum(f.status == VERIFIED for f in self.files)
        lines = [f"  verified: {done} of {len(self.files) - len(self.unread)} files against {how}; {size(self.bytes_hashed)} hashed "
                 f"beside the reads, the slowest rank's hashing {slowest_seconds:.2f} s"]
        if self.failed:
            lines.append(f"  verification failed ({len(self.failed)}):")
            for f in self.failed[:limit]:
                why = _WHY[f.status].format(algorithm=f.algorithm, expected=f.expected, size=f.size,
                                            expected_size=f.expected_size)
                if f.failed_on:
                    why += (f"; {_BY[f.status]} rank{'s' if len(f.failed_on) > 1 else ''} "
                            f"{','.join(map(str, f.failed_on))}")
                lines.append(f"    {f.name}  ({why})")
            if len(self.failed) > limit:
                lines.append(f"    ... and {len(self.failed) - limit} more (see --json)")
        if self.unread:
            lines.append(f"  not read by this load, not verified ({len(self.unread)}):")
            lines += [f"    {f.label}  ({f.status}: {_WHY[f.status]})" for f in self.unread[:limit]]
            if len(self.unread) > limit:
                lines.append(f"    ... and {len(self.unread) - limit} more (see --json)")
        return lines


def _count(names: list[str], what: str) -> str:
    return f"{len(names)} {what}{'s' if len(names) > 1 else ''}"


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def merge(comm: "Comm", checks: Checks, hashed: Hashed) -> Verification:
    """Combines every rank's outcome (one all-reduce; one gather more when a file differs, and one
    when the ranks' unread files do).

    Every rank calls it with the same ``checks`` (the ranks agreed on their shape before reading),
    but the files it does not read are each rank's own: one more gather names the ranks that saw
    each when they differ. A file that any rank found of the wrong size is ``size-differs`` (and
    counts as hashed by none).
    """
    n = len(checks.files)
    mine = torch.tensor(hashed.outcome, dtype=torch.int64).reshape(n)
    unread = [(u.name, u.status) for u in checks.unchecked if u.status in UNREAD]
    key = _key(unread)
    local = torch.cat([(mine == MATCHED).long(), (mine == DIFFERS).long(), (mine == SIZE_DIFFERS).long(),
                       torch.tensor([hashed.bytes_hashed, *key, *(k * k for k in key)], dtype=torch.int64)])
    total = comm.sum_counts(local).tolist()
    matched, differs, sized = total[:n], total[n:2 * n], total[2 * n:3 * n]
    sums, squares = total[3 * n + 1:3 * n + 1 + len(key)], total[3 * n + 1 + len(key):]
    # every rank's key is the same exactly when world * sum(k*k) == sum(k)**2 (Cauchy-Schwarz)
    same = all(comm.world_size * q == s * s for s, q in zip(sums, squares))
    failed_on: list[tuple[int, ...]] = [()] * n
    if any(differs) or any(sized):  # names travel only for what failed
        rows = comm.gather_rows(mine.to(torch.int8))
        bad = (rows == DIFFERS) | (rows == SIZE_DIFFERS)
        failed_on = [tuple(int(r) for r in bad[:, i].nonzero().flatten()) for i in range(n)]
    verdicts = [FileVerdict(name=f.name, algorithm=f.algorithm, expected=f.expected, hashes=matched[i] + differs[i],
                            failed_on=failed_on[i], size=f.size, expected_size=f.expected_size,
                            status=WRONG_SIZE if sized[i] else DIFFERENT if differs[i] else
                            VERIFIED if matched[i] else UNHASHED)
                for i, f in enumerate(checks.files)]
    verdicts += [FileVerdict(name=u.name, status=u.status) for u in checks.unchecked if u.status not in UNREAD]
    seen = {entry: None for entry in unread} if same else _seen_on(comm.gather_objects(unread))
    verdicts += [FileVerdict(name=name, status=status, seen_on=ranks) for (name, status), ranks in seen.items()]
    return Verification(reference=checks.reference, source=checks.source, bytes_hashed=total[3 * n],
                        files=tuple(sorted(verdicts, key=lambda v: (v.name, v.status))))


_KEY_PARTS, _KEY_BITS = 3, 20
"""an unread list's key: 60 bits in 20-bit parts, so a part's square summed over 2**23 ranks fits int64"""


def _key(unread: list[tuple[str, str]]) -> list[int]:
    """The ``_KEY_PARTS`` numbers that stand for a rank's unread (name, status) list in the all-reduce."""
    digest = int.from_bytes(hashlib.blake2b(json.dumps(unread).encode(), digest_size=8).digest(), "big")
    return [(digest >> (_KEY_BITS * i)) & ((1 << _KEY_BITS) - 1) for i in range(_KEY_PARTS)]


def _seen_on(lists: list[list[tuple[str, str]]]) -> dict[tuple[str, str], tuple[int, ...] | None]:
    """Each unread (name, status) in the ranks' ``lists`` and the ranks that saw it (None: every rank)."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, entries in enumerate(lists):
        for name, status in entries:
            seen.setdefault((name, status), []).append(rank)
    return {entry: None if len(ranks) == len(lists) else tuple(ranks) for entry, ranks in seen.items()}
