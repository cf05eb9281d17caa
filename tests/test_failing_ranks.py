"""A rank that fails, or is killed, ends the whole job quickly, with its error on every rank."""

import re

import pytest

import distload
from distload.testing import WorkerDied
from tests import failure_jobs


@pytest.fixture(scope="module")
def example():
    return distload.example_checkpoint()


@pytest.mark.parametrize("victim", [0, 3])
def test_a_rank_that_raises_stops_every_rank_at_once(pool, example, victim):
    out = pool.run(4, failure_jobs.fail_while_reading, example, 2, victim, "raise", 30.0)
    assert out[victim]["type"] == "CheckpointError" and out[victim]["rank"] == victim
    for rank, o in enumerate(out):
        assert not o["ok"]
        if rank != victim:
            assert o["type"] == "PeerFailedError", o
            assert o["failed_rank"] == victim and o["lost_ranks"] == [], o  # it reports itself
            assert "injected read failure" in o["message"]
            assert o["file"] == "injected.safetensors" and o["tensor"] == "model.norm.weight"
    # measured from the failure, far below the 30 s dead-rank timeout: it travelled out of band
    after = max(o["finished_at"] for o in out) - out[victim]["finished_at"]
    assert after < 3, after


def test_a_rank_failing_before_reading_stops_the_others(pool, example):
    out = pool.run(4, failure_jobs.fail_while_building, example, 2, 1)
    assert out[1]["type"] == "PlanError"
    assert all(o["type"] == "PeerFailedError" and o["failed_rank"] == 1 for r, o in enumerate(out) if r != 1)


def test_a_rank_far_behind_still_reads_the_failure_of_the_store_host(pool, example):
    """Rank 0 serves the store and fails at once; rank 3 is still building its model 6 s later.
    Rank 0 stays until rank 3 has read the failure (its heartbeat reads it), so rank 3 reports
    rank 0's error, not a lost store."""
    out = pool.run(4, failure_jobs.fail_while_building, example, 2, 0, 3, 6.0)
    assert out[0]["type"] == "PlanError"
    for o in out[1:]:
        assert o["type"] == "PeerFailedError" and o["failed_rank"] == 0, o
        assert "injected planning failure" in o["message"] and o["tensor"] == "model.embed_tokens.weight", o


@pytest.mark.parametrize("victim", [2, 0])
def test_a_killed_rank_ends_the_job_within_the_bound(pool, example, victim, tmp_path):
    timeout = 3.0
    stamp = str(tmp_path / "killed-at")
    out = pool.run(4, failure_jobs.fail_while_reading, example, 2, victim, "kill", timeout, stamp, timeout=150)
    assert isinstance(out[victim], WorkerDied)
    with open(stamp) as f:
        killed_at = float(f.read())
    for rank, o in enumerate(out):
        if rank != victim:
            assert o["type"] == "PeerFailedError", o
            assert o["failed_rank"] == victim and o["lost_ranks"] == [victim], o
            if victim == 0:  # rank 0 hosted the store (no torchrun agent here): its loss ends the job
                assert re.fullmatch(rf"lost the rendezvous store hosted by rank 0 \(connection closed: [^()]+\) "
                                    rf"\[rank {rank}\]", o["message"]), o
            else:
                assert re.fullmatch(rf"rank {victim} silent for \d+ s \(no heartbeat\) \[rank {victim}\]",
                                    o["message"]), o
            # bound: the timeout, a heartbeat interval, and slack for a loaded 2-core machine
            assert o["finished_at"] - killed_at < timeout + 8, (o, killed_at)
