"""What every benchmark loader shares: one rank's context, the pieces it must fill, and the check.

A loader runs on one rank of a job whose process group exists. Its parameters come from
distload itself (``distload.prepare.prepare`` builds the rank's reference model on the meta device
and plans; ``distload.prepare.materialize`` allocates it), so every loader fills exactly the same
tensors, and ``plan.for_rank(rank).reads`` says which slice of which checkpoint tensor goes
into which parameter slice. ``verify`` compares filled slices with the checkpoint read
independently through ``safetensors.safe_open``: a loader that fills the wrong bytes fails
its run instead of reporting a fast time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from distload.execute import destination


@dataclass
class Ctx:
    """One rank's view of a benchmark job."""

    directory: str
    """checkpoint directory"""
    rank: int
    world: int
    local_rank: int
    local_world: int
    tp: int
    dp: int
    device: torch.device
    cold: bool = False
    """cold-cache run: peers use their direct-I/O back-ends (buffered ones when warm)"""
    threads: int = 1
    """reader threads for this rank: the node's cores / its local ranks"""
    plan: Any = None
    rank_plan: Any = None
    model: Any = None
    """the rank's filled model (``prepare`` allocates it; distload's loader returns its own)"""
    params: dict[str, torch.Tensor] | None = None
    state: dict = field(default_factory=dict)
    """what a loader keeps between setup, run and verify (buffers, file descriptors)"""

    def layout(self):
        from distload.layout import Layout
        return Layout.for_world(self.world, tp=self.tp, dp=self.dp)

    def plan_only(self) -> None:
        """Builds the rank's model on the meta device and its plan (headers only, no data)."""
        if self.plan is not None:
            return
        from distload.prepare import prepare
        from distload.comm import Collectives
        from distload.config import LoadConfig
        from distload.models import reference_model
        layout = self.layout()
        config = LoadConfig(tp=self.tp, dp=self.dp, device=self.device.type)
        _, self.state["meta_model"], _, self.plan = prepare(
            self.directory, config, layout, reference_model, rank=self.rank, ops=Collectives(None, layout.tp),
            stage_ops=Collectives(None, layout.tp * layout.dp))
        self.rank_plan = self.plan.for_rank(self.rank)

    def prepare(self) -> None:
        """``plan_only``, then allocates the model on the device and applies padding zeros and
        optional defaults (what distload's executor does before reading)."""
        from distload.prepare import materialize
        if self.params is not None:
            return
        self.plan_only()
        self.model = materialize(self.state.pop("meta_model"), self.device)
        self.params = params_of(self.model, self.rank_plan)
        with torch.no_grad():
            for name in self.rank_plan.zero:
                self.params[name].zero_()
            for name, value in self.rank_plan.defaults:
                self.params[name].fill_(value)

    def reads(self) -> list:
        """The reads that fill parameters (verify-only reads are left out)."""
        return [r for r in self.rank_plan.reads if not r.verify]

    def reads_by_file(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for r in self.reads():
            out.setdefault(r.tensor.file, []).append(r)
        return dict(sorted(out.items()))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def params_of(model, rank_plan) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor, for every parameter the rank plan names."""
    names = {r.param for r in rank_plan.reads} | set(rank_plan.zero) | {n for n, _ in rank_plan.defaults}
    out = {}
    for name in names:
        module, _, attr = name.rpartition(".")
        out[name] = getattr(model.get_submodule(module), attr)
    return out


def source_slice(read) -> tuple[int, int, int] | None:
    """``(dim, start, length)`` of the piece ``read`` takes from its checkpoint tensor; None: all of it."""
    if read.dim is None:
        return None
    shape = read.tensor.shape or (1,)
    inner = 1
    for size in shape[read.dim + 1:]:
        inner *= size
    start = (read.offset - read.tensor.begin) // (inner * read.tensor.itemsize)
    return read.dim, start, read.shape[read.dim]


def piece_of(full: torch.Tensor, read) -> torch.Tensor:
    """The piece of the full checkpoint tensor ``full`` that ``read`` places."""
    sl = source_slice(read)
    if sl is None:
        return full
    if full.dim() == 0:
        full = full.reshape(1)
    dim, start, length = sl
    return full.narrow(dim, start, length)


def slices_of(read) -> tuple[slice, ...] | None:
    """The piece as an index for ``safe_open(...).get_slice(name)[...]``; None: the whole tensor."""
    sl = source_slice(read)
    if sl is None or not read.tensor.shape:
        return None
    dim, start, length = sl
    return (slice(None),) * dim + (slice(start, start + length),)


def place(params: dict[str, torch.Tensor], read, piece: torch.Tensor) -> None:
    """Copies ``piece`` (any device) into its parameter slice."""
    dest = destination(params, read)
    with torch.no_grad():
        dest.copy_(piece.reshape(dest.shape), non_blocking=piece.is_pinned())


def sample_reads(reads: list, limit: int | None = 3) -> list:
    """The reads a check compares: all of them, or a deterministic few that cover a column
    shard (several runs), the largest piece and the last read."""
    if limit is None or len(reads) <= limit:
        return list(reads)
    chosen = []
    for pick in (next((r for r in reads if r.count > 1), None), max(reads, key=lambda r: r.nbytes), reads[-1],
                 reads[0], reads[len(reads) // 2]):
        if pick is not None and pick not in chosen:
            chosen.append(pick)
    return chosen[:limit]


def expected_piece(read) -> torch.Tensor:
    """The checkpoint piece ``read`` names, read independently with ``safe_open``."""
    from safetensors import safe_open
    with safe_open(read.tensor.file, framework="pt") as f:
        index = slices_of(read)
        if index is None:
            return f.get_tensor(read.tensor.name).reshape(read.shape)
        return f.get_slice(read.tensor.name)[index]


SAMPLE_BYTES = 24 * 1024 * 1024
"""with a sampled check, a larger piece is compared in three windows of rows (first, middle,
last) of this many bytes together: a wrong or shifted tensor still shows, and a check of a
1 GB embedding does not cost seconds per run"""


def _windows(t: torch.Tensor, cap: int | None) -> torch.Tensor:
    """``t`` itself, or its first, middle and last rows when it is larger than ``cap`` bytes."""
    size = t.numel() * t.element_size()
    if cap is None or size <= cap or t.dim() == 0 or t.shape[0] < 4:
        return t
    k = max(1, t.shape[0] * cap // size // 3)
    mid = t.shape[0] // 2
    return torch.cat([t[:k], t[mid:mid + k], t[-k:]])


def verify_params(ctx: Ctx, limit: int | None = 3) -> dict:
    """Compares parameter slices with the checkpoint. Returns ``{"ok", "checked", "bad"}``.

    ``limit=None`` compares every read whole; otherwise a few reads, large ones in windows.
    """
    params = ctx.params
    if params is None:  # a loader that built its own model (distload): find the same names in it
        ctx.plan_only()
        params = params_of(ctx.model, ctx.rank_plan)
    bad = []
    cap = None if limit is None else SAMPLE_BYTES
    chosen = sample_reads(ctx.reads(), limit)
    for r in chosen:
        dest = destination(params, r).detach()
        got = _windows(dest, cap).cpu()
        want = _windows(expected_piece(r).reshape(dest.shape), cap)
        if got.dtype != want.dtype or not torch.equal(_bytes(got), _bytes(want)):
            bad.append(f"{r.param} <- {r.tensor.name}{list(source_slice(r) or ())}")
    return {"ok": not bad, "checked": len(chosen), "bad": bad[:5]}


def verify_buffer(ctx: Ctx, buffer: torch.Tensor, spans: list[tuple[Any, int]], limit: int | None = 3) -> dict:
    """Compares the bytes of reads placed back to back in ``buffer`` (``spans``: (read, offset))."""
    where = {id(r): off for r, off in spans}
    bad = []
    cap = None if limit is None else SAMPLE_BYTES
    chosen = sample_reads([r for r, _ in spans], limit)
    for r in chosen:
        got = buffer[where[id(r)]:where[id(r)] + r.nbytes]
        want = _bytes(expected_piece(r))
        if not torch.equal(_windows(got, cap).cpu(), _windows(want, cap)):
            bad.append(r.tensor.name)
    return {"ok": not bad, "checked": len(chosen), "bad": bad[:5]}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
