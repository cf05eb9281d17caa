"""Mixture-of-experts layers of models whose checkpoints pack every expert of a layer into one
tensor (gpt-oss, Llama 4): the experts, read as regions of those tensors, and the router that
picks the top-k logits before scoring them.

The packed tensors are input-major, ``gate_up_proj [experts, hidden, 2 x intermediate]`` and
``down_proj [experts, intermediate, hidden]``, and the parameters keep that layout, so every
expert's piece is copied as it lies on disk:

- gate and up **interleaved** along the last dim (gpt-oss: gate at even columns, up at odd):
  expert e's TP shard is one contiguous column range of ``2 I / etp`` columns holding both, a
  unit per expert per shard; the forward splits even and odd columns of the shard.
- gate and up as the two **halves** of the last dim (Llama 4): each half is its own region of
  the expert, cut into ``etp`` column ranges, a unit per expert per part per shard.

``down_proj`` is cut into row ranges (contiguous), its bias added once, by expert shard 0.
The two matrices are quantizable (``TARGET`` ``PackedExperts``): a format storing them otherwise
(gpt-oss's MXFP4 ``*_blocks`` / ``*_scales`` ``[E, out, in / 32, 16]``, output-major) declares its
tensors as the same experts' boxes. With ``block`` the intermediate features split over expert
TP on whole blocks of that many, ``ceil(blocks / etp)`` a rank and the last fewer (MXFP4 at
2880 = 90 x 32 over 4 or 8 ranks); the short shards end in zeros, which add nothing: the padded
gate and up columns (and their bias) are zero, so are the activations fed to the padded rows of
``down_proj``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError
from ..experts import ExpertPlacement
from ..quant.layer import Quantizable
from ..spec import ExpertSources, ParamSpec, Region, Shard, Source
from .moe import routed_to

GLU = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(gate, up) -> the activation fed to ``down_proj``"""


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama 4)."""
    return F.silu(gate) * up


class PackedExperts(nn.Module, Quantizable):
    """The expert slots of one expert group, each slot this rank's shard of its expert:
    ``gate_up_proj [slots, H, 2 I / etp]``, ``down_proj [slots, I / etp, H]`` and, with ``bias``,
    ``gate_up_proj_bias [slots, 2 I / etp]`` and ``down_proj_bias [slots, H]``, named as the
    checkpoint names the packed tensors (``<path>.gate_up_proj``).

    Args:
        interleaved: gate and up alternate along the last dim (else: its two halves).
        glu: the activation of (gate, up).
        weight_inputs: a token's routing weight scales its input (Llama 4), not the expert's output.
        shard: this rank's index among its expert's ``etp`` shard holders (shard 0 adds the down bias).
        block: split the intermediate features on whole blocks of this many, unevenly (the
            quantization format's ``feature_block``); None: evenly, ``I / etp`` a rank.
    """

    QUANTIZABLE = ("gate_up_proj", "down_proj")
    TARGET = "PackedExperts"
    MATRIX_DIMS = {"gate_up_proj": (1, 0), "down_proj": (1, 0)}  # input-major: [in, out] per expert

    def __init__(self, hidden: int, intermediate: int, placement: ExpertPlacement, *, group: int, shard: int,
                 etp: int, interleaved: bool, glu: GLU, bias: bool = False, weight_inputs: bool = False,
                 block: int | None = None, dtype=None, device=None) -> None:
        super().__init__()
        if block is None and intermediate % etp:
            raise PlanError(f"expert intermediate size {intermediate} is not divisible by expert tp={etp}")
        self.hidden, self.intermediate, self.placement, self.etp = hidden, intermediate, placement, etp
        self.interleaved, self.glu, self.weight_inputs, self.shard = interleaved, glu, weight_inputs, shard
        self.block = block
        self.local_slots = placement.group_slots(group)
        n, i = len(self.local_slots), self._cut(0).piece_len(intermediate)
        self.gate_up_proj = nn.Parameter(torch.empty(n, hidden, 2 * i, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(n, i, hidden, dtype=dtype, device=device))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n, 2 * i, dtype=dtype, device=device)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(n, hidden, dtype=dtype, device=device)) if bias else None

    def _spec(self, path: str, attr: str, parts: tuple[Source, ...]) -> ParamSpec:
        return ParamSpec(name=f"{path}.{attr}", shape=tuple(getattr(self, attr).shape),
                         experts=ExpertSources(placement=self.placement, parts=parts))

    def _cut(self, dim: int, width: int = 1) -> Shard:
        """The expert-TP split of intermediate features along ``dim``, ``width`` entries a feature
        (2: gate and up interleaved)."""
        if self.block is None:
            return Shard(dim=dim, num_shards=self.etp)
        return Shard(dim=dim, num_shards=self.etp, pad=True, block=self.block * width)

    def _gate_up(self, name: str, rows: tuple[int, ...]) -> tuple[Source, ...]:
        """The gate/up parts of one expert of ``name`` (``rows``: the dims before the column dim)."""
        half, dim = self.intermediate, len(rows)
        full = (self.placement.num_experts, *rows, 2 * half)
        if self.interleaved:  # one box per expert, its shards contiguous column ranges
            return (Source(name=name, shape=(*rows, 2 * half), shard=self._cut(dim, width=2),
                           region=Region(tensor_shape=full, at=(0,))),)
        cut = self._cut(dim)
        local = cut.piece_len(half)
        return tuple(Source(name=name, shape=(*rows, half), shard=cut, offset=k * local,
                            region=Region(tensor_shape=full, at=(0,), dim=dim, start=k * half, stop=(k + 1) * half,
                                          label=label)) for k, label in enumerate(("gate", "up")))

    def unquantized_specs(self, path: str):
        h, i, e = self.hidden, self.intermediate, self.placement.num_experts
        yield self._spec(path, "gate_up_proj", self._gate_up(f"{path}.gate_up_proj", (h,)))
        yield self._spec(path, "down_proj", (Source(name=f"{path}.down_proj", shape=(i, h), shard=self._cut(0),
                                                     region=Region(tensor_shape=(e, i, h), at=(0,))),))
        if self.gate_up_proj_bias is not None:
            yield self._spec(path, "gate_up_proj_bias", self._gate_up(f"{path}.gate_up_proj_bias", ()))
            yield self._spec(path, "down_proj_bias", (Source(name=f"{path}.down_proj_bias", shape=(h,),
                                                              region=Region(tensor_shape=(e, h), at=(0,))),))

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of every token's chosen experts that it hosts (as
        ``FusedExperts.forward``: each choice served by one copy, summed over the ranks)."""
        out = torch.zeros_like(tokens)
        # [slots, in, out]; dequantized once per call when stored quantized
        gate_up_w, down_w = self.matrix("gate_up_proj", tokens.dtype), self.matrix("down_proj", tokens.dtype)
        for j, physical in enumerate(self.local_slots):
            rows, col = routed_to(self.placement, physical, experts)
            if rows.numel() == 0:
                continue
            x, w = tokens[rows], weights[rows, col, None].to(tokens.dtype)
            if self.weight_inputs:
                x = x * w
            gate_up = x @ gate_up_w[j]
            if self.gate_up_proj_bias is not None:
                gate_up = gate_up + self.gate_up_proj_bias[j]
            gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if self.interleaved else gate_up.chunk(2, dim=-1)
            y = self.glu(gate, up) @ down_w[j]
            if self.down_proj_bias is not None and self.shard == 0:
                y = y + self.down_proj_bias[j]
            out.index_add_(0, rows, y if self.weight_inputs else y * w)
        return out


class TopKRouter(nn.Module):
    """``weight [E, H]`` (and ``bias [E]``), replicated: the top-k logits, then their scores, a
    softmax over the k (gpt-oss) or a sigmoid of each (Llama 4)."""

    def __init__(self, num_experts: int, hidden: int, *, top_k: int, bias: bool, sigmoid: bool, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.top_k, self.sigmoid = top_k, sigmoid
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device)) if bias else None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights, experts), each ``[N, k]``."""
        top, experts = torch.topk(F.linear(tokens, self.weight, self.bias), self.top_k, dim=-1)
        weights = torch.sigmoid(top.float()).to(top.dtype) if self.sigmoid else torch.softmax(top, dim=-1)
        return weights, experts
