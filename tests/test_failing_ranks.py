"""A rank that fails, or is killed, ends the whole job quickly, with its error on every rank."""

import re

import pytest

from distload.testing import WorkerDied
from tests import failure_jobs
from tests.devices import and_on_gpus


@pytest.mark.parametrize("victim,ranks", and_on_gpus([0, 3], lambda victim: 4, ["0", "3"]), indirect=["ranks"])
def test_a_rank_that_raises_stops_every_rank_at_once(ranks, example, victim):
    out = ranks.run(4, failure_jobs.fail_while_reading, example, 2, victim, "raise", 30.0, None, ranks.device)
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


@pytest.mark.parametrize("late_s,failure_timeout,late_at", [(6.0, 30.0, "build"), (4.0, 2.0, "watch")])
def test_a_rank_far_behind_still_reads_the_failure_of_the_store_host(pool, example, late_s, failure_timeout,
                                                                     late_at):
    """Rank 0 serves the store and fails at once; rank 3 is seconds behind: still building its
    model (its heartbeat reads the failure), or not yet watching at all. Rank 0 stays until rank
    3 has read it, so rank 3 reports rank 0's error, not a lost store. With a failure timeout
    below the delay, the ranks that read the failure and stopped beating are not also counted
    as silent (which would end rank 0's wait before rank 3 arrives)."""
    out = pool.run(4, failure_jobs.fail_while_building, example, 2, 0, 3, late_s, failure_timeout, late_at)
    assert out[0]["type"] == "PlanError"
    for o in out[1:]:
        assert o["type"] == "PeerFailedError" and o["failed_rank"] == 0, o
        assert "injected planning failure" in o["message"] and o["tensor"] == "model.embed_tokens.weight", o


@pytest.mark.parametrize("victim,ranks", and_on_gpus([2, 0], lambda victim: 4, ["2", "0"]), indirect=["ranks"])
def test_a_killed_rank_ends_the_job_within_the_bound(ranks, example, victim, tmp_path):
    timeout = 3.0
    out, killed_at = _killed(ranks, example, 4, victim, "kill", timeout, tmp_path)
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


# (world, victim): the victim fails as it enters the load's first collective, which the others
# have entered (every rank met first); on NCCL their collective waits on the device for good
IN_COLLECTIVE = and_on_gpus([(2, 1), (4, 2)], lambda world, victim: world, ["w2-victim1", "w4-victim2"])


@pytest.mark.parametrize("world,victim,ranks", IN_COLLECTIVE, indirect=["ranks"])
def test_a_rank_killed_inside_a_collective_ends_the_others_within_the_bound(ranks, example, world, victim,
                                                                           tmp_path):
    timeout = 3.0
    out, killed_at = _killed(ranks, example, world, victim, "kill-in-collective", timeout, tmp_path)
    for rank, o in enumerate(out):
        if rank != victim:
            assert o["type"] == "PeerFailedError", o
            assert o["failed_rank"] == victim and o["lost_ranks"] == [victim], o
            assert re.fullmatch(rf"rank {victim} silent for \d+ s \(no heartbeat\) \[rank {victim}\]",
                                o["message"]), o
            assert o["finished_at"] - killed_at < timeout + 8, (o, killed_at)


@pytest.mark.parametrize("world,victim,ranks", IN_COLLECTIVE, indirect=["ranks"])
def test_a_rank_raising_inside_a_collective_stops_the_others(ranks, example, world, victim):
    timeout = 6.0
    try:
        out = ranks.run(world, failure_jobs.fail_while_reading, example, 2, victim, "raise-in-collective", timeout,
                        None, ranks.device, timeout=150)
    finally:
        _fresh_if_nccl(ranks)
    assert out[victim]["type"] == "CheckpointError" and out[victim]["rank"] == victim
    for rank, o in enumerate(out):
        if rank != victim:
            assert o["type"] == "PeerFailedError" and o["failed_rank"] == victim and o["lost_ranks"] == [], o
            assert o["message"] == f"injected failure in a collective [file injected.safetensors, rank {victim}]", o
    after = max(o["finished_at"] for o in out) - out[victim]["finished_at"]
    if ranks.device == "cuda":  # the waiting ranks read the failure beside NCCL's work, and abort it
        assert after < 3, after
    else:  # gloo holds them until the victim's connections close (when its group is freed) or the
        # collective's timeout, the failure timeout while watched
        assert after < timeout + 8, after


def _killed(ranks, example, world: int, victim: int, how: str, timeout: float, tmp_path) -> tuple[list, float]:
    """Runs ``fail_while_reading`` with rank ``victim`` SIGKILLed (``how``); returns every rank's
    outcome and the time of the kill, once the victim's worker is known to have died."""
    stamp = str(tmp_path / "killed-at")
    try:
        out = ranks.run(world, failure_jobs.fail_while_reading, example, 2, victim, how, timeout, stamp, ranks.device,
                        timeout=150)
    finally:
        _fresh_if_nccl(ranks)
    assert isinstance(out[victim], WorkerDied)
    with open(stamp) as f:
        return out, float(f.read())


def _fresh_if_nccl(ranks) -> None:
    """Restarts an NCCL pool's workers after a test that aborted their communicators."""
    if ranks.device == "cuda":
        ranks.restart()
