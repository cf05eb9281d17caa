"""Mixture-of-experts layers: this rank's expert slots stacked into two parameters, a
replicated router, and the token exchange that sends each token to its experts' ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import SOLO, Collectives
from ..experts import ExpertPlacement
from ..errors import PlanError
from ..quant.layer import Quantizable
from ..spec import ExpertSources, ParamSpec, Shard, Source, sibling


class FusedExperts(nn.Module, Quantizable):
    """The expert slots of one expert group: ``w13 [slots, 2 I / etp, H]`` (gate rows, then up
    rows) and ``w2 [slots, H, I / etp]``, each slot's rows this rank's shard of its expert.

    Every slot's gate, up and down are units of their own, per expert, named as in the
    checkpoint (``names`` are templates beside this module with an ``{expert}`` field).
    """

    QUANTIZABLE = ("w13", "w2")

    def __init__(self, hidden: int, intermediate: int, placement: ExpertPlacement, *, group: int, etp: int,
                 names: tuple[str, str, str], dtype=None, device=None) -> None:
        super().__init__()
        if intermediate % etp:
            raise PlanError(f"expert intermediate size {intermediate} is not divisible by expert tp={etp}")
        self.hidden, self.intermediate, self.placement, self.etp, self.names = hidden, intermediate, placement, etp, names
        self.local_slots = placement.group_slots(group)
        n, i = len(self.local_slots), intermediate // etp
        self.w13 = nn.Parameter(torch.empty(n, 2 * i, hidden, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(n, hidden, i, dtype=dtype, device=device))

    def unquantized_specs(self, path: str):
        gate, up, down = (sibling(path, n) + ".weight" for n in self.names)
        i = self.intermediate // self.etp
        rows = Shard(dim=0, num_shards=self.etp)
        yield ParamSpec(name=f"{path}.w13", shape=tuple(self.w13.shape), experts=ExpertSources(
            placement=self.placement,
            parts=(Source(name=gate, shape=(self.intermediate, self.hidden), shard=rows, offset=0),
                   Source(name=up, shape=(self.intermediate, self.hidden), shard=rows, offset=i))))
        yield ParamSpec(name=f"{path}.w2", shape=tuple(self.w2.shape), experts=ExpertSources(
            placement=self.placement,
            parts=(Source(name=down, shape=(self.hidden, self.intermediate), shard=Shard(dim=1, num_shards=self.etp)),)))

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of every token's chosen experts that it hosts.

        Args:
            tokens: ``[N, H]``; weights / experts: ``[N, k]`` routing of each token.
        A token whose expert has several copies is served by exactly one, chosen by
        its row number, so summing over all ranks counts each choice once.
        """
        out = torch.zeros_like(tokens)
        w13, w2 = self.matrix("w13", tokens.dtype), self.matrix("w2", tokens.dtype)
        for j, physical in enumerate(self.local_slots):
            rows, col = routed_to(self.placement, physical, experts)
            if rows.numel() == 0:
                continue
            gate, up = F.linear(tokens[rows], w13[j]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2[j])
            out.index_add_(0, rows, y * weights[rows, col, None].to(y.dtype))
        return out


def routed_to(placement: ExpertPlacement, physical: int, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)`` of the routing choices ``experts [N, k]`` that physical slot ``physical``
    serves: those naming its expert, of the rows whose number picks this copy (row mod copies)."""
    slots = placement.slots
    expert = slots[physical]
    copies = [s for s, e in enumerate(slots) if e == expert]
    rows_all = torch.arange(experts.shape[0], device=experts.device)
    hit = (experts == expert) & ((rows_all % len(copies)) == copies.index(physical))[:, None]
    return hit.nonzero(as_tuple=True)


class Router(nn.Module):
    """``gate.weight [E, H]``, replicated: softmax over experts in float32, then top-k."""

    def __init__(self, num_experts: int, hidden: int, *, top_k: int, renormalize: bool, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights, experts), each ``[N, k]``."""
        probs = torch.softmax(F.linear(tokens, self.weight).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(tokens.dtype), experts


class ExpertExchange:
    """Moves tokens to the ranks that host their experts and the results back.

    With ep = 1 a replica's TP ranks already share their tokens and together hold every
    expert: their partial sums are added over the TP group. With ep > 1 the experts are
    spread over the whole stage: every rank's tokens are gathered over the stage, each
    rank adds what its experts give every token, the sums are added over the stage, and
    each rank keeps its own rows (the simplest correct exchange, not the fastest).
    """

    def __init__(self, *, tp_ops: Collectives = SOLO, stage_ops: Collectives | None = None,
                 stage_index: int = 0) -> None:
        self.tp_ops, self.stage_ops, self.stage_index = tp_ops, stage_ops, stage_index

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.stage_ops is None else self.stage_ops.all_gather(tokens, dim=0)

    def scatter_sum(self, partial: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if self.stage_ops is None:
            return self.tp_ops.all_reduce(partial)
        total = self.stage_ops.all_reduce(partial)
        return total[self.stage_index * num_tokens:(self.stage_index + 1) * num_tokens]
