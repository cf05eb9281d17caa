"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into ``tp`` equal row blocks of ``ceil(V / tp)`` rows. When
``tp`` does not divide ``V`` the last blocks end in padding rows: they are no units,
hold zeros, and their logits are sliced off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import SOLO, Collectives
from ..spec import ParamSpec, Role, Shard, Source, SpecProvider, sibling


def vocab_shard(tp: int) -> Shard:
    return Shard(dim=0, num_shards=tp, pad=True)


class VocabParallelEmbedding(nn.Module, SpecProvider):
    """Embedding whose rows are split over the TP group; lookups are summed over it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp: int = 1, tp_rank: int = 0,
                 ops: Collectives = SOLO, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp, self.ops = num_embeddings, embedding_dim, tp, ops
        self.rows = vocab_shard(tp).piece_len(num_embeddings)
        self.start = tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ops.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def param_specs(self, path: str):
        yield ParamSpec(name=f"{path}.weight", shape=(self.rows, self.embedding_dim),
                        sources=(Source(name=f"{path}.weight", shape=(self.num_embeddings, self.embedding_dim),
                                        shard=vocab_shard(self.tp)),))


class ParallelLMHead(nn.Module, SpecProvider):
    """Logits over the full vocabulary from a vocabulary-split weight.

    With ``tied`` the weight *is* the embedding's: a derived parameter whose source
    is the embedding unit. With ``tied_copy`` (a tied head on another pipeline stage
    than the embedding) it is a separate weight filled from the embedding's units.
    A ``lm_head.weight`` that a tied checkpoint carries anyway is read and verified
    equal to the embedding (see ``ParamSpec.verify``). ``tied_name`` is the embedding's name
    beside the head (``model.embed_tokens.weight``): under a multimodal wrapper both sit behind
    its prefix.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp: int = 1,
                 tied: VocabParallelEmbedding | None = None, tied_name: str = "", tied_copy: bool = False,
                 ops: Collectives = SOLO, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp, self.ops = num_embeddings, embedding_dim, tp, ops
        self.tied_name = tied_name
        rows = vocab_shard(tp).piece_len(num_embeddings)
        if tied is not None:
            self.weight = tied.weight
        else:
            self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype, device=device))
        self.tied = tied is not None
        self.tied_copy = tied_copy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[..., : self.num_embeddings]

    def param_specs(self, path: str):
        source = Source(name=f"{path}.weight", shape=(self.num_embeddings, self.embedding_dim),
                        shard=vocab_shard(self.tp))
        tied_name = sibling(path, self.tied_name)
        if self.tied:
            yield ParamSpec(name=f"{path}.weight", shape=tuple(self.weight.shape), role=Role.DERIVED,
                            derived_from=(tied_name,), verify=(source,))
        elif self.tied_copy:
            embed = Source(name=tied_name, shape=source.shape, shard=source.shard)
            yield ParamSpec(name=f"{path}.weight", shape=tuple(self.weight.shape), sources=(embed,),
                            derived_from=(tied_name,), verify=(source,))
        else:
            yield ParamSpec(name=f"{path}.weight", shape=tuple(self.weight.shape), sources=(source,))
