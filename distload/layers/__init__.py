"""Parallel layers whose parameters declare the checkpoint units that fill them."""

from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import ColumnParallelLinear, Part, ReplicatedLinear, RowParallelLinear, shards_for
from .norm import RMSNorm

__all__ = ["ColumnParallelLinear", "ParallelLMHead", "Part", "ReplicatedLinear", "RMSNorm", "RowParallelLinear",
           "VocabParallelEmbedding", "shards_for"]
