"""Bytes requested per rank in a real TP=8 load stay within 1.1x of the rank's fair share.

A rank's share is 1/8 of every sharded tensor plus every replicated one (norms); it is
computed from the checkpoint's shapes alone, not from the planner. This is a ratio
test, not a timing: the numbers are bytes the executor requested from the files.
"""

from __future__ import annotations

import pytest

from tests.bench_jobs import byte_shares, load_bytes_job
from tests.synthetic import write_llama_checkpoint

pytestmark = pytest.mark.slow

TP = 8
BOUND = 1.1
# Llama-shaped, ~225 MB of bf16: written in a second or two
CFG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
       "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64,
       "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-bytes")
    shapes = write_llama_checkpoint(str(directory), CFG)
    return str(directory), shapes


def test_each_rank_requests_at_most_its_share(pool, checkpoint):
    directory, shapes = checkpoint
    out = pool.run(TP, load_bytes_job, directory, TP, raise_errors=True)
    report = out[0]["report"]
    assert report["complete"] is True and report["layout"]["tp"] == TP
    assert all(o["report"]["ranks"] == report["ranks"] for o in out)  # one merged report
    shares = byte_shares(shapes, CFG, TP, itemsize=2)
    share = shares["share_bytes"]
    total = shares["sharded_bytes"] + shares["replicated_bytes"]
    assert share < total / 7  # the share is a real fraction of the checkpoint
    per_rank = [r["bytes_read"] for r in report["ranks"]]
    assert len(per_rank) == TP
    for rank, nbytes in enumerate(per_rank):
        ratio = nbytes / share
        assert ratio <= BOUND, f"rank {rank} requested {nbytes} bytes, {ratio:.3f}x its share of {share}"
        # and none of its share was skipped: a complete load reads at least the share
        assert nbytes >= share, f"rank {rank} requested {nbytes} bytes, less than its share {share}"
    assert report["bytes_read"] == sum(per_rank)
