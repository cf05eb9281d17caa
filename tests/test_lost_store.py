"""A stopped rank, or a stopped or killed host of the rendezvous store, ends every other rank
within the failure timeout, with one PeerFailedError that names the lost rank and what was seen.

The stopped-rank cases run as plain processes (a launch without torchrun, as the README allows):
the pool waits for every rank, and a stopped one never answers.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from distload.testing import free_port
from distload.watch import STORE_SLACK, BoundedStore, StoreLost

WORLD, TIMEOUT = 4, 3.0
SLACK = 8.0  # a heartbeat interval, start-up of the watch, and a loaded 2-core machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_world(directory: str, victim: int, stamp: str, *, how: str = "stop",
              agent_store: bool = False) -> tuple[list[dict], float]:
    """Runs ``failure_jobs.fail_while_reading`` on WORLD plain processes; rank ``victim`` SIGSTOPs
    itself (``how``: after its first read, or in the first collective). With ``agent_store``, this
    process serves the store, as torchrun's agent does.

    Returns:
        every other rank's outcome (by rank; None for the victim), and the time the last one exited.
    """
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD)}
    server = None
    if agent_store:
        import torch.distributed as dist
        server = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=60),
                               wait_for_workers=False)
        env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    args = json.dumps({"directory": directory, "tp": 2, "victim": victim, "how": how,
                       "failure_timeout": TIMEOUT, "stamp": stamp})
    procs = [subprocess.Popen([sys.executable, "-m", "tests.failure_jobs", args], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(WORLD)]
    try:
        out: list = [None] * WORLD
        for rank, proc in enumerate(procs):
            if rank != victim:
                stdout, stderr = proc.communicate(timeout=150)  # the harness's bound: no test hangs
                assert proc.returncode == 0 and stdout.strip(), (rank, proc.returncode, stderr[-3000:])
                out[rank] = json.loads(stdout.strip().splitlines()[-1])
        return out, time.time()
    finally:
        for proc in procs:  # SIGKILL ends a stopped process too
            proc.kill()
            proc.wait()
        del server


@pytest.mark.parametrize("agent_store", [False, True], ids=["rank0-hosts-store", "launcher-hosts-store"])
def test_a_stopped_rank_0_ends_every_rank_within_the_bound(example, tmp_path, agent_store):
    stamp = str(tmp_path / "stopped-at")
    out, exited = run_world(example, 0, stamp, agent_store=agent_store)
    with open(stamp) as f:
        stopped_at = float(f.read())
    for rank, o in enumerate(out[1:], start=1):
        assert o["type"] == "PeerFailedError" and o["failed_rank"] == 0 and o["lost_ranks"] == [0], o
        if agent_store:  # the store lives on: rank 0's watcher publishes its silence
            assert re.fullmatch(r"rank 0 silent for \d+ s \(no heartbeat\) \[rank 0\]", o["message"]), o
        else:  # the store was in rank 0's process: every rank sees it stop answering
            assert o["message"] == f"lost the rendezvous store hosted by rank 0 (no reply within {TIMEOUT + STORE_SLACK:g} s) [rank {rank}]"
        assert o["finished_at"] - stopped_at < TIMEOUT + SLACK, (o, stopped_at)
    # and the processes ended too: nothing (a destructor, the heartbeat) waited for the stopped store
    assert exited - stopped_at < TIMEOUT + SLACK + 5, (exited, stopped_at)


# in a collective: the others wait inside gloo, which only the collectives' bounded timeout ends
@pytest.mark.parametrize("how", ["stop", "stop-in-collective"])
def test_a_stopped_rank_is_named_silent_by_every_rank(example, tmp_path, how):
    stamp = str(tmp_path / "stopped-at")
    out, _ = run_world(example, 2, stamp, how=how)
    with open(stamp) as f:
        stopped_at = float(f.read())
    for o in (out[0], out[1], out[3]):
        assert re.fullmatch(r"rank 2 silent for \d+ s \(no heartbeat\) \[rank 2\]", o["message"]), o
        assert o["type"] == "PeerFailedError" and o["failed_rank"] == 2 and o["lost_ranks"] == [2], o
        assert o["finished_at"] - stopped_at < TIMEOUT + SLACK, (o, stopped_at)


class _FrozenStore:
    """A store whose host stopped: every call blocks until ``thaw``."""

    def __init__(self) -> None:
        self.thawed = threading.Event()
        self.calls: list[str] = []

    def clone(self):
        return self

    def set_timeout(self, timeout) -> None:
        pass

    def add(self, key: str, amount: int) -> int:
        self.calls.append(key)
        self.thawed.wait(30)
        return 0


def test_a_store_call_ends_at_its_deadline_and_the_store_stays_lost():
    frozen = _FrozenStore()
    store = BoundedStore(frozen, deadline=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(StoreLost, match=r"^no reply within 0.5 s$"):
            store.call("add", "a", 1)
        assert time.monotonic() - start < 0.5 + 2
        with pytest.raises(StoreLost, match=r"^no reply within 0.5 s$"):  # at once, without a second call
            store.call("add", "b", 1)
    finally:
        frozen.thawed.set()
        store.close()
    assert frozen.calls == ["a"]

