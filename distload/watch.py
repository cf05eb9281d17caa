"""The out-of-band failure channel: failures, heartbeats and meetings through the rendezvous
store, so that no rank waits in a collective for a rank that failed or died.

It talks to the store object ``comm`` hands it, never to torch.distributed itself.
"""

from __future__ import annotations

import json
import threading
import time

from .errors import DistloadError, PeerFailedError


class FailureWatch:
    """Out-of-band failure channel over the rendezvous store.

    A failing rank stores its error and bumps a shared counter; every rank polls that
    one counter while it waits. A background thread bumps this rank's heartbeat and
    watches the next rank's (a ring, so each rank reads one key): a rank silent for
    ``dead_after`` seconds (killed, or its host gone) is published as failed by its
    watcher. Keys carry a generation so consecutive loads on one group never mix.
    """

    def __init__(self, store, *, rank: int, world_size: int, dead_after: float, timeout: float) -> None:
        self.store, self.rank, self.world_size, self.dead_after = store, rank, world_size, dead_after
        self.timeout = timeout  # the longest wait for a rank that is alive but has not arrived
        # every rank adds once per load before any collective of that load completes
        self.prefix = f"distload/{(int(store.add('distload/generation', 1)) - 1) // world_size}/"
        self._stop = threading.Event()
        self._failed = False  # once a failure is known, the store may vanish: touch it no more
        self._meetings = 0
        self._watch_peer = True
        # the first beat before load() goes on: a peer that has never beaten has not started yet
        store.add(f"{self.prefix}beat/{rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="distload-heartbeat", daemon=True)
        self._thread.start()

    def publish(self, rank: int, err: DistloadError, *, linger: float = 0.0) -> None:
        """Stores ``err`` as rank ``rank``'s failure; with ``linger``, waits (bounded) until every
        other rank has read it or failed itself, since this process may host the store and exit next.

        Failures are numbered in the order they are published, so every rank reports the
        first one (the cause), not a later consequence of it.
        """
        self._failed = True
        try:
            order = int(self.store.add(f"{self.prefix}failed", 1))
            # plain JSON, never a pickle: the store is open to anyone who can reach it
            self.store.set(f"{self.prefix}error/{order}", json.dumps(
                {"rank": rank, "message": err.message, "file": err.file, "tensor": err.tensor}))
            deadline = time.monotonic() + linger
            # a rank that failed too never reads: counting it avoids waiting out the linger
            # when every rank fails alike (a bad checkpoint)
            while time.monotonic() < deadline and int(self.store.add(f"{self.prefix}seen", 0)) + \
                    int(self.store.add(f"{self.prefix}failed", 0)) < self.world_size:
                time.sleep(0.01)
        except Exception:  # the store itself is gone: peers will notice that instead
            pass

    def _add(self, key: str, amount: int) -> int:
        try:
            return int(self.store.add(key, amount))
        except Exception as err:  # the store's host (rank 0 without torchrun) is gone
            self._failed = True
            raise PeerFailedError(f"lost the rendezvous store ({type(err).__name__}: {err}); "
                                  "rank 0 or the launcher died", rank=self.rank) from None

    def _has(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception as err:
            self._failed = True
            raise PeerFailedError(f"lost the rendezvous store ({type(err).__name__}: {err}); "
                                  "rank 0 or the launcher died", rank=self.rank) from None

    def check(self) -> None:
        """Raises PeerFailedError if a rank published a failure (or the store is gone)."""
        if self._add(f"{self.prefix}failed", 0):
            self._failed = True
            err = self._first_error()
            try:
                self.store.add(f"{self.prefix}seen", 1)
            except Exception:
                pass
            raise err

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
        self._meetings += 1
        key = f"{self.prefix}meet/{self._meetings}"
        if self._add(key, 1) == self.world_size:
            self.store.set(f"{key}/all", b"1")
            return
        deadline = time.monotonic() + self.timeout
        # poll fast in small jobs; in large ones every waiting rank polling one store must back off
        cap = 0.002 if self.world_size <= 64 else 0.02
        pause = 0.0002
        while True:
            self.check()
            if self._has(f"{key}/all"):
                return
            time.sleep(pause)
            pause = min(pause * 2, cap)
            if time.monotonic() > deadline:  # alive (heartbeats) but stuck, e.g. a hung read
                arrived = self._add(key, 0)
                err = PeerFailedError(f"{self.world_size - arrived} rank(s) did not reach step {self._meetings} "
                                      f"within {self.timeout:.0f} s (a hung read or a stuck rank?)", rank=self.rank)
                self.publish(self.rank, err)
                raise err

    def stop(self) -> None:
        if not self._failed:
            self.mark_done()
        self._stop.set()
        # after a failure the thread may sit in a call to a store that is gone; it is a daemon
        self._thread.join(timeout=0.1 if self._failed else 5)

    def _first_error(self) -> PeerFailedError:
        try:  # the first failure's number is 1; its text follows its number by a moment
            deadline = time.monotonic() + 5.0
            while not self._has(f"{self.prefix}error/1") and time.monotonic() < deadline:
                time.sleep(0.01)
            err = json.loads(self.store.get(f"{self.prefix}error/1"))
            return PeerFailedError(str(err["message"]), file=err.get("file"), tensor=err.get("tensor"),
                                   rank=int(err["rank"]), failed_rank=int(err["rank"]))
        except Exception as exc:
            return PeerFailedError(f"another rank failed, but its error could not be read ({exc})", rank=self.rank)

    def _beat(self) -> None:
        peer = (self.rank + 1) % self.world_size
        interval = min(1.0, self.dead_after / 5)
        started = tick = time.monotonic()
        last_seen, since = 0, started
        while not self._stop.wait(interval):
            try:
                self.store.add(f"{self.prefix}beat/{self.rank}", 1)
                if not self._watch_peer or int(self.store.add(f"{self.prefix}done/{peer}", 0)):
                    continue  # the peer finished its load: silence is expected
                seen = int(self.store.add(f"{self.prefix}beat/{peer}", 0))
            except Exception:
                return  # store gone; check() on the main thread reports it
            now = time.monotonic()
            # a gap as long as the timeout itself means this process was not running: no verdict
            starved, tick = now - tick > self.dead_after, now
            if seen != last_seen or starved:  # after a stall of this process, silence proves nothing
                last_seen, since = seen, now
            elif seen == 0 and now - started < self.timeout:
                continue  # the peer has not started its load yet (ranks may call load() apart)
            elif now - since > self.dead_after:
                self.publish(peer, DistloadError(
                    f"rank {peer} stopped responding: no heartbeat for {now - since:.0f} s "
                    f"(killed, or its host is gone)", rank=peer))
                self._watch_peer = False  # keep beating: this rank is alive, and others watch it

    def mark_done(self) -> None:
        try:
            self.store.add(f"{self.prefix}done/{self.rank}", 1)
        except Exception:
            pass
