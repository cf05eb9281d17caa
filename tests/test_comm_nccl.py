"""What ``Comm`` does on NCCL when a peer fails, checked on the CPU: the control flow around torch's
calls, with torch's abort and teardown replaced by recorders (the real ones run in the gpu-marked
tests of tests/test_failing_ranks.py). The failure channel is the real one, over an in-process store.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from distload.comm import Comm
from distload.errors import DistloadError, PeerFailedError
from distload.watch import FailureWatch


class PendingWork:
    """An NCCL collective whose peer never joined: it never completes."""

    def __init__(self) -> None:
        self.polls = 0
        self.waited = False

    def is_completed(self) -> bool:
        self.polls += 1
        return False

    def wait(self) -> bool:
        self.waited = True
        return True


@pytest.fixture
def torch_calls(monkeypatch):
    """Records torch.distributed's abort and destroy as Comm calls them (a group "exists")."""
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda group=None: calls.append("abort"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append("destroy"))
    return calls


def nccl_comm(store) -> Comm:
    """Rank 0 of 2 on a CUDA device, watched over ``store`` (rank 1 never beats: not started yet)."""
    comm = Comm(rank=0, world_size=2, device=torch.device("cuda", 0), owns_group=True, grouped=True)
    comm._watch = FailureWatch(store, rank=0, world_size=2, dead_after=3.0, timeout=60.0)
    return comm


def test_a_failure_published_while_an_nccl_collective_waits_aborts_every_group_and_is_raised(torch_calls):
    store = dist.HashStore()
    comm = nccl_comm(store)
    peer = FailureWatch(store, rank=1, world_size=2, dead_after=3.0, timeout=60.0)
    work = PendingWork()
    threading.Timer(0.3, lambda: peer.publish(1, DistloadError("injected peer failure", rank=1))).start()
    start = time.monotonic()
    with pytest.raises(PeerFailedError) as err:
        comm._wait(work)
    assert time.monotonic() - start < 2.5  # read from the store between polls, not at a timeout
    assert str(err.value) == "injected peer failure [rank 1]" and err.value.failed_rank == 1
    assert work.polls > 1 and not work.waited  # polled, never waited on in the host
    assert torch_calls == ["abort"]
    comm.close()  # aborted: nothing is left to destroy
    assert torch_calls == ["abort"]
    peer.stop()


def test_a_failed_nccl_load_aborts_its_group_instead_of_destroying_it(torch_calls, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # the launcher serves the store: no linger
    comm = nccl_comm(dist.HashStore())
    comm.peer_failed()  # what load() does when a peer failed outside a collective
    comm.close()
    assert torch_calls == ["abort"]


def test_a_good_nccl_load_and_a_failed_gloo_load_destroy_their_group(torch_calls):
    comm = nccl_comm(dist.HashStore())
    comm.close()
    gloo = Comm(rank=0, world_size=2, device=torch.device("cpu"), owns_group=True, grouped=True)
    gloo._failed = True
    gloo.close()
    assert torch_calls == ["destroy", "destroy"]


def test_a_completed_nccl_collective_is_waited_on_once_and_aborts_nothing(torch_calls):
    comm = nccl_comm(dist.HashStore())
    work = PendingWork()
    work.is_completed = lambda: True
    comm._wait(work)
    assert work.waited and torch_calls == []
    comm.close()
    assert torch_calls == ["destroy"]
