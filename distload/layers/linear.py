"""Tensor-parallel linear layers that declare which checkpoint units fill them.

Column-parallel layers split the output features (dim 0 of the weight) and keep
their output sharded; row-parallel layers split the input features (dim 1) and
sum their partial outputs over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..comm import SOLO, Collectives
from ..errors import PlanError
from ..quant.layer import Quantizable
from ..spec import ParamSpec, Region, Shard, Source, sibling


@dataclass(frozen=True, kw_only=True, slots=True)
class Part:
    """One checkpoint matrix fused into a column-parallel weight (q, k, v; gate, up)."""

    name: str
    """sibling module name in the checkpoint (``q_proj``), or the layer's own path if empty"""
    out_features: int
    """rows of the checkpoint matrix"""
    num_shards: int
    """distinct row blocks over the TP group (fewer than tp: replicated, as GQA KV heads)"""


def shards_for(units: int, tp: int, what: str) -> int:
    """Returns how many distinct pieces ``units`` (heads, experts) form over ``tp`` ranks.

    ``tp`` must divide ``units`` (each rank gets ``units / tp``) or be a multiple of it
    (each unit is replicated on ``tp / units`` ranks).
    """
    if units % tp == 0:
        return tp
    if tp % units == 0:
        return units
    raise PlanError(f"{what}={units} does not fit tp={tp}: tp must divide {units} "
                    f"or be a multiple of it")


class ColumnParallelLinear(nn.Module, Quantizable):
    """``y = x W^T + b`` with W's rows split over the TP group; output stays sharded.

    With several ``parts`` the local weight is the concatenation of each part's rows
    (a fused QKV or gate/up projection); each part is its own checkpoint unit. With
    ``fused_on_disk`` the checkpoint stores the parts as one tensor named like the layer
    (Phi-3's ``qkv_proj``), their rows concatenated in part order: each part is a region
    of it, sharded inside that region, and ``Part.name`` is the region's label.

    Example:
        >>> layer = ColumnParallelLinear(64, [Part(name="gate_proj", out_features=128, num_shards=2),
        ...                                   Part(name="up_proj", out_features=128, num_shards=2)],
        ...                              tp=2, device="meta")
        >>> tuple(layer.weight.shape)
        (128, 64)
    """

    def __init__(self, in_features: int, parts: list[Part], *, tp: int = 1, bias: bool = False,
                 fused_on_disk: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for part in parts:
            if part.out_features % part.num_shards or tp % part.num_shards:
                raise PlanError(f"{part.name or 'output'} has {part.out_features} rows, which do not "
                                f"split into {part.num_shards} pieces for tp={tp}")
        self.in_features = in_features
        self.parts = tuple(parts)
        self.tp = tp
        self.fused_on_disk = fused_on_disk
        self.local_sizes = tuple(p.out_features // p.num_shards for p in parts)
        out = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def unquantized_specs(self, path: str):
        for attr, tail in (("weight", (self.in_features,)), ("bias", ())):
            if getattr(self, attr) is None:
                continue
            sources, offset, row = [], 0, 0
            full = (sum(p.out_features for p in self.parts), *tail)
            for part, local in zip(self.parts, self.local_sizes):
                shape, shard = (part.out_features, *tail), Shard(dim=0, num_shards=part.num_shards)
                if self.fused_on_disk:
                    region = Region(tensor_shape=full, dim=0, start=row, stop=row + part.out_features,
                                    label=part.name)
                    sources.append(Source(name=f"{path}.{attr}", shape=shape, offset=offset, shard=shard,
                                          region=region))
                else:
                    name = f"{sibling(path, part.name) if part.name else path}.{attr}"
                    sources.append(Source(name=name, shape=shape, offset=offset, shard=shard))
                offset += local
                row += part.out_features
            yield ParamSpec(name=f"{path}.{attr}", shape=(offset, *tail), sources=tuple(sources))


class RowParallelLinear(nn.Module, Quantizable):
    """``y = sum_tp(x_local W_local^T) + b`` with W's columns split over the TP group.

    The input arrives sharded along its last dim (the output of a column-parallel
    layer); the bias is replicated and added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, *, tp: int = 1, bias: bool = False,
                 ops: Collectives = SOLO, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % tp:
            raise PlanError(f"row-parallel input size {in_features} is not divisible by tp={tp}")
        self.in_features, self.out_features, self.tp, self.ops = in_features, out_features, tp, ops
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.all_reduce(self.linear(x, None))
        return y + self.bias if self.bias is not None else y

    def unquantized_specs(self, path: str):
        yield ParamSpec(name=f"{path}.weight", shape=tuple(self.weight.shape),
                        sources=(Source(name=f"{path}.weight", shape=(self.out_features, self.in_features),
                                        shard=Shard(dim=1, num_shards=self.tp)),))
        if self.bias is not None:
            yield ParamSpec(name=f"{path}.bias", shape=(self.out_features,),
                            sources=(Source(name=f"{path}.bias", shape=(self.out_features,)),))


class ReplicatedLinear(nn.Module, Quantizable):
    """``y = x W^T + b`` with the whole weight on every rank (DeepSeek's low-rank projections)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, quantizable: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.quantizable = in_features, out_features, quantizable
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def unquantized_specs(self, path: str):
        for attr, shape in (("weight", (self.out_features, self.in_features)), ("bias", (self.out_features,))):
            if getattr(self, attr) is not None:
                yield ParamSpec(name=f"{path}.{attr}", shape=shape, sources=(Source(name=f"{path}.{attr}", shape=shape),))
