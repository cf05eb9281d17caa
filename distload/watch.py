"""The out-of-band failure channel: failures, heartbeats and meetings through the rendezvous
store, so that no rank waits in a collective for a rank that failed or died.

It talks to the store object ``comm`` hands it, never to torch.distributed itself, and
every call it makes ends within the failure timeout (``BoundedStore``).
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
import time
from typing import Callable

from .errors import DistloadError, PeerFailedError


class StoreLost(Exception):
    """The store did not answer in time, or its connection broke; the message says which."""


STORE_SLACK = 5.0
"""seconds a store call may take beyond the failure timeout: on an oversubscribed host (8 ranks
on 2 cores) the store's serving thread in rank 0 has been starved for over 3 s, and a store
lost for good must not be declared on a busy host"""


class BoundedStore:
    """The store, with a deadline on every call: ``call`` returns or raises ``StoreLost``
    within ``deadline`` seconds, whatever the store's host does.

    Calls run on one helper thread, over a connection of its own (``store.clone()``). Why:
    on torch 2.13 a TCPStore client's timeout bounds only ``get``/``wait`` and connecting;
    ``add``, ``set``, ``check`` and ``clone`` to a SIGSTOPped host block until it resumes
    or dies, and a timed-out ``get``/``wait`` leaves its reply owed on the socket. So a call
    that overruns is abandoned on the helper (a daemon), the connection with it, and the
    store is lost for good; the process group's own connection is never the one stuck. The
    handoff costs about 20 us a call (40 against 18 direct, measured on loopback).
    """

    def __init__(self, store, *, deadline: float) -> None:
        self.deadline = deadline
        self.lost: str | None = None  # what was observed, once a call overran or failed
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, args=(store,), name="distload-store", daemon=True)
        self._thread.start()

    def call(self, method: str, *args: object) -> object:
        """Runs ``store.<method>(*args)`` and returns its result.

        Raises:
            StoreLost: no reply within the deadline, the call failed, or the store was lost before.
        """
        if self.lost is not None:
            raise StoreLost(self.lost)
        done, box = threading.Event(), []
        self._calls.put((method, args, box, done))
        step = min(0.25, self.deadline / 4)
        waited, last = 0.0, time.monotonic()
        while not done.wait(step):
            now = time.monotonic()
            waited += min(now - last, 2 * step)  # a stall of this process itself is no silence of the store
            last = now
            if waited >= self.deadline:
                self.lost = self.lost or f"no reply within {self.deadline:g} s"
            if self.lost is not None:  # this call's deadline, or an earlier call's (queued behind it)
                raise StoreLost(self.lost)
        ok, value = box[0]
        if not ok:
            self.lost = self.lost or value
            raise StoreLost(self.lost)
        return value

    def close(self) -> None:
        """Ends the helper (at once, unless it is stuck in a call) and refuses further calls."""
        self.lost = self.lost or "the failure watch was stopped"
        self._calls.put(None)

    def _serve(self, store) -> None:
        try:  # here, not in __init__: connecting to a stopped host blocks too
            own = store.clone()
            own.set_timeout(datetime.timedelta(seconds=self.deadline))  # bounds get and wait on it
        except Exception:  # a store without clone (older torch, other kinds): share it
            own = store
        while (item := self._calls.get()) is not None:
            method, args, box, done = item
            if self.lost is not None:  # queued behind the call that overran: never sent
                box.append((False, self.lost))
            else:
                try:
                    box.append((True, getattr(own, method)(*args)))
                except Exception as err:
                    box.append((False, _observed(err)))
            done.set()


def _observed(err: Exception) -> str:
    """What a failed store call saw, in one line (torch's first sentence, no guess at the cause)."""
    first = (str(err).splitlines() or [""])[0].split(". ")[0].strip()
    if "Network" in type(err).__name__:  # DistNetworkError: a reset, a refused or closed connection
        return f"connection closed: {first}" if first else "connection closed"
    return f"{type(err).__name__}: {first}"


class FailureWatch:
    """Out-of-band failure channel over the rendezvous store.

    A failing rank stores its error and bumps a shared counter; every rank polls that
    one counter while it waits. A background thread bumps this rank's heartbeat and
    watches the next rank's (a ring, so each rank reads one key): a rank silent for
    ``dead_after`` seconds (killed, stopped, or its host gone) is published as failed by its
    watcher. A store that does not answer for ``dead_after`` seconds is lost: every rank
    sees that itself, since nothing can be published any more. Keys carry a generation so
    consecutive loads on one group never mix.
    """

    def __init__(self, store, *, rank: int, world_size: int, dead_after: float, timeout: float,
                 store_host: int | None = None) -> None:
        self.rank, self.world_size, self.dead_after = rank, world_size, dead_after
        self.timeout = timeout  # the longest wait for a rank that is alive but has not arrived
        self.store_host = store_host  # the rank whose process serves the store (None: the launcher's)
        self.store = BoundedStore(store, deadline=dead_after + STORE_SLACK)
        self._stop = threading.Event()
        self._failed = False  # once a failure is known, the store may vanish: touch it no more
        self._noticed: PeerFailedError | None = None  # a peer's failure, read once (by either thread)
        self._notice_lock = threading.Lock()
        self._meetings = 0
        self._watch_peer = True
        try:
            # every rank adds once per load before any collective of that load completes
            self.prefix = f"distload/{(int(self._call('add', 'distload/generation', 1)) - 1) // world_size}/"
            # the first beat before load() goes on: a peer that has never beaten has not started yet
            self._call("add", f"{self.prefix}beat/{rank}", 1)
        except BaseException:
            self.store.close()
            raise
        self._thread = threading.Thread(target=self._beat, name="distload-heartbeat", daemon=True)
        self._thread.start()

    def _call(self, method: str, *args: object) -> object:
        try:
            return self.store.call(method, *args)
        except StoreLost as lost:
            self._failed = True
            host = "" if self.store_host is None else f" hosted by rank {self.store_host}"
            lost_ranks = () if self.store_host is None else (self.store_host,)
            raise PeerFailedError(f"lost the rendezvous store{host} ({lost})", rank=self.rank,
                                  failed_rank=self.store_host, lost_ranks=lost_ranks) from None

    def publish(self, rank: int, err: DistloadError, *, lost: bool = False) -> None:
        """Stores ``err`` as rank ``rank``'s failure (``lost``: rank ``rank`` fell silent).

        Failures are numbered in the order they are published, so every rank reports the
        first one (the cause), not a later consequence of it.
        """
        self._failed = True
        self._watch_peer = False  # a silence from now on is a consequence, and would be counted twice
        try:
            order = int(self._call("add", f"{self.prefix}failed", 1))
            # plain JSON, never a pickle: the store is open to anyone who can reach it
            self._call("set", f"{self.prefix}error/{order}", json.dumps(
                {"rank": rank, "message": err.message, "file": err.file, "tensor": err.tensor, "lost": lost}))
        except Exception:  # the store itself is gone: peers will notice that instead
            pass

    def linger(self, seconds: float) -> None:
        """After a failure, waits (at most ``seconds``) until every rank has read it, failed
        itself or finished its load, since this process may host the store, or be ended with its
        peers, next."""
        deadline = time.monotonic() + seconds
        try:
            # a rank that failed too, or finished, never reads: counting it ends the wait at once
            # when every rank fails alike (a bad checkpoint)
            while time.monotonic() < deadline and sum(int(self._call("add", f"{self.prefix}{count}", 0))
                                                      for count in ("seen", "failed", "finished")) < self.world_size:
                time.sleep(0.01)
        except Exception:
            pass

    def check(self) -> None:
        """Raises PeerFailedError if a rank published a failure (or the store is lost)."""
        self._raise_noticed()
        if self._call("add", f"{self.prefix}failed", 0):
            self._notice()
            self._raise_noticed()

    def _raise_noticed(self) -> None:
        if self._noticed is not None:
            self._failed = True
            raise self._noticed

    def _notice(self) -> None:
        """Reads the first published failure and counts this rank as having seen it, once: the
        heartbeat does it too, so a rank deep in one long read still tells the store's host
        (lingering in ``publish``) that it may go."""
        with self._notice_lock:
            if self._noticed is not None:
                return
            self._watch_peer = False  # this rank stops beating: its watcher, too, knows the cause
            err = self._first_error()
            try:
                self._call("add", f"{self.prefix}seen", 1)
            except PeerFailedError:
                pass
            self._noticed = err

    def await_failure(self, cause: Exception) -> None:
        """After a collective broke, waits (bounded) for the failure that explains it, and raises.

        A failing rank publishes before it closes its connections; a killed one is
        published by its watcher within ``dead_after``.
        """
        deadline = time.monotonic() + self.dead_after + 2.0
        while time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)
        err = PeerFailedError(f"a collective failed and no rank explained why: {cause}", rank=self.rank)
        self.publish(self.rank, err)  # so that no other rank waits for this one at the next meeting
        raise err

    def meet(self) -> None:
        """Returns once every rank has called ``meet`` as often as this one (a store barrier).

        The last rank to arrive sets a key; the others poll for it (backing off to 2 ms, or
        20 ms above 64 ranks), checking for failures between polls. (At 8 ranks on 2 cores a
        10 ms cap made the merge 40% slower and the load no faster. A blocking ``store.wait``
        with a timeout is no way out: a timed-out wait leaves its reply owed on the client's
        socket, and logs a warning each time.)
        """
        self._raise_noticed()  # read by the heartbeat meanwhile: the store's host may have gone since
        self._meetings += 1
        key = f"{self.prefix}meet/{self._meetings}"
        if self._call("add", key, 1) == self.world_size:
            self._call("set", f"{key}/all", b"1")
            return
        deadline = time.monotonic() + self.timeout
        for pause in self._pauses():
            self.check()
            if self._call("check", [f"{key}/all"]):
                return
            time.sleep(pause)
            if time.monotonic() > deadline:  # alive (heartbeats) but stuck, e.g. a hung read
                arrived = self._call("add", key, 0)
                err = PeerFailedError(f"{self.world_size - arrived} rank(s) did not reach step {self._meetings} "
                                      f"within {self.timeout:.0f} s (a hung read or a stuck rank?)", rank=self.rank)
                self.publish(self.rank, err)
                raise err

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Returns once ``done()`` is true (a collective queued on a device has completed), checking
        for failures between polls, backing off as ``meet`` does. No deadline of its own: every rank
        has met before, so only a failed or silent rank keeps it waiting, and the heartbeats tell.

        Raises:
            PeerFailedError: a rank published a failure (or fell silent), or the store is lost.
        """
        for pause in self._pauses():
            if done():
                return
            self.check()
            time.sleep(pause)

    def _pauses(self):
        """The sleeps between polls: doubling from 0.2 ms to 2 ms, or to 20 ms above 64 ranks (in
        large jobs every waiting rank polls one store, and must back off)."""
        pause, cap = 0.0002, 0.002 if self.world_size <= 64 else 0.02
        while True:
            yield pause
            pause = min(pause * 2, cap)

    def stop(self) -> None:
        """Ends the heartbeat (bounded: after a failure it may sit in a store call, and is a daemon)."""
        if not self._failed:
            self.mark_done()
        self._stop.set()
        self._thread.join(timeout=0.1 if self._failed else 5)
        self.store.close()

    def _first_error(self) -> PeerFailedError:
        try:  # the first failure's number is 1; its text follows its number by a moment
            deadline = time.monotonic() + 5.0
            while not self._call("check", [f"{self.prefix}error/1"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            err = json.loads(self._call("get", f"{self.prefix}error/1"))
            failed = int(err["rank"])
            return PeerFailedError(str(err["message"]), file=err.get("file"), tensor=err.get("tensor"),
                                   rank=failed, failed_rank=failed, lost_ranks=(failed,) if err.get("lost") else ())
        except PeerFailedError as lost:  # the store went while the error was read
            return lost
        except Exception as exc:
            return PeerFailedError(f"another rank failed, but its error could not be read ({exc})", rank=self.rank)

    def _beat(self) -> None:
        peer = (self.rank + 1) % self.world_size
        interval = min(1.0, self.dead_after / 5)
        started = tick = time.monotonic()
        last_seen, since = 0, started
        while not self._stop.wait(interval):
            try:
                self._call("add", f"{self.prefix}beat/{self.rank}", 1)
                if not self._failed and self._noticed is None and self._call("add", f"{self.prefix}failed", 0):
                    self._notice()  # the main thread raises it at its next check
                    return  # this rank fails now, and the store's host may go once all have read
                if not self._watch_peer or int(self._call("add", f"{self.prefix}done/{peer}", 0)):
                    continue  # the peer finished its load: silence is expected
                seen = int(self._call("add", f"{self.prefix}beat/{peer}", 0))
            except PeerFailedError:
                return  # store lost; the main thread's next call raises it at once
            now = time.monotonic()
            # a gap as long as the timeout itself means this process was not running: no verdict
            starved, tick = now - tick > self.dead_after, now
            if seen != last_seen or starved:  # after a stall of this process, silence proves nothing
                last_seen, since = seen, now
            elif seen == 0 and now - started < self.timeout:
                continue  # the peer has not started its load yet (ranks may call load() apart)
            elif now - since > self.dead_after:
                # what was observed, not a guess at why (killed, stopped, hung or its host gone)
                self.publish(peer, DistloadError(f"rank {peer} silent for {now - since:.0f} s (no heartbeat)",
                                                 rank=peer), lost=True)
                self._watch_peer = False  # keep beating: this rank is alive, and others watch it

    def mark_done(self) -> None:
        """Tells this rank's watcher that its silence from now on is expected, and a lingering
        rank that this one will never read its failure."""
        try:
            self._call("add", f"{self.prefix}done/{self.rank}", 1)
            self._call("add", f"{self.prefix}finished", 1)
        except PeerFailedError:
            pass
