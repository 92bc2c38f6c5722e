"""A rank that fails ends the run on every rank, with an error naming it, instead of a hang.

Without this, the other ranks sit in their next collective until the process-group timeout
(minutes), and then report a timeout that does not say which rank broke. torchrun's agent kills
local siblings when a worker dies, but ranks launched by srun, Ray or on other nodes wait.

How: the failing rank writes "rank R: Error: message" under a key in the rendezvous store and
waits (briefly) until every other rank has read it. Each rank runs a watcher thread that polls
the key; when it appears, the watcher acknowledges it and gives the main thread a grace period
to unwind by itself (gloo raises once the failed rank's sockets close); if the main thread is
still stuck in a collective after that (NCCL), the watcher prints the error and ends the process.

A rank killed outright (SIGKILL, the out-of-memory killer, a lost node) publishes nothing, so every
rank also beats: its watcher adds 1 to "beat/R" at each poll. A rank whose own collective fails
first waits until every peer has beaten since (a fraction of a second when all live) or `stale_s`
passes; a peer that stayed silent is named, "rank R failed: no longer responding (killed?)". The
watcher names a peer silent for `stale_s` the same way (the only way out of an NCCL collective
with a dead peer). A rank that ends its work normally sets "left/R" and is no longer watched. When
the store itself is gone, its host (rank 0, unless torchrun's agent hosts it) is the one named.
A preempted render (Preempted: every rank stopped at the same step, engine/io/stop.py) is no failure:
each rank leaves as after normal work and its own Preempted propagates.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

from unison.engine.errors import PeerFailed, Preempted


class FailureWatch:
    """Context manager around a rank's work; a no-op on one rank."""

    def __init__(self, store, *, rank: int, world_size: int, poll_s: float = 0.2, grace_s: float = 5.0,
                 stale_s: float = 5.0, store_rank: int | None = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.grace_s, self.stale_s = poll_s, grace_s, stale_s
        self.store_rank = store_rank
        """The rank whose process hosts the store (None: it outlives the ranks, as torchrun's agent)."""
        self.peer_failure: str | None = None
        self._heard: dict[int, tuple[int, float]] = {}
        """peer -> (its beats, when that count was first seen), kept by the watcher."""
        self._stop = threading.Event()
        self._unwound = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="unison-failure-watch", daemon=True)

    @classmethod
    def from_env(cls, *, rank: int, world_size: int, timeout_s: float, **kwargs) -> "FailureWatch":
        """Watch over a separate connection to the rendezvous store at MASTER_ADDR:MASTER_PORT
        (set by torchrun, our Slurm and Ray launchers, and the tests)."""
        if world_size == 1 or "MASTER_ADDR" not in os.environ:
            return cls(None, rank=rank, world_size=1)
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return cls(dist.PrefixStore(f"unison/failure/{attempt}", client), rank=rank, world_size=world_size,
                   store_rank=None if agent_store else 0, **kwargs)

    @property
    def active(self) -> bool:
        return self.world_size > 1 and self.store is not None

    def __enter__(self) -> "FailureWatch":
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        self._unwound.set()
        self._stop.set()
        self._thread.join()
        if exc is None or isinstance(exc, Preempted):  # every rank stopped at the same step: no failure
            try:
                self.store.set(f"left/{self.rank}", "1")
            except (RuntimeError, OSError):
                pass
            return False
        failure = self.peer_failure or self._diagnose()
        if failure is not None:
            raise PeerFailed(f"{failure} (rank {self.rank} stopped because of it)") from exc
        self._report(exc)
        return False

    def _read_failure(self) -> str | None:
        try:
            if self.store.check(["message"]):
                return self.store.get("message").decode()
        except (RuntimeError, OSError):  # the store's host is gone
            return None
        return None

    def _beat(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)

    def _beats(self) -> dict[int, int]:
        """Every watched peer's beat count (0: not started yet); raises when the store is gone."""
        return {peer: self.store.add(f"beat/{peer}", 0) for peer in range(self.world_size)
                if peer != self.rank and not self.store.check([f"left/{peer}"])}

    @staticmethod
    def _silent(peer: int) -> str:
        return f"rank {peer} failed: no longer responding (killed?)"

    def _store_lost(self) -> str | None:
        return self._silent(self.store_rank) if self.store_rank not in (None, self.rank) else None

    def _diagnose(self) -> str | None:
        """After this rank's own error: a failure a peer published, or a peer that stayed silent
        while every other one beat (killed: it could publish nothing), or None (the error is ours)."""
        started = time.monotonic()
        try:
            before = self._beats()
        except (RuntimeError, OSError):
            return self._read_failure() or self._store_lost()
        while True:
            failure = self._read_failure()
            if failure is not None:
                return failure
            try:
                self._beat()  # a peer diagnosing the same loss must not take this rank for dead
                now = self._beats()
            except (RuntimeError, OSError):
                return self._store_lost()
            silent = sorted(peer for peer, count in now.items() if count == before.get(peer, count))
            if not silent:
                return None
            if time.monotonic() - started > self.stale_s:
                return self._silent(silent[0])
            time.sleep(self.poll_s)

    def _silence(self) -> str | None:
        """The watcher's beat; names a started peer whose beats stopped `stale_s` ago. (A store
        that is gone is left to the main thread: its host may have ended normally.)"""
        now = time.monotonic()
        try:
            self._beat()
            beats = self._beats()
        except (RuntimeError, OSError):
            return None
        for peer in [p for p in self._heard if p not in beats]:  # left
            del self._heard[peer]
        for peer, count in beats.items():
            if self._heard.get(peer, (None, 0.0))[0] != count:
                self._heard[peer] = (count, now)
        stale = sorted(peer for peer, (count, since) in self._heard.items() if count and now - since > self.stale_s)
        return self._silent(stale[0]) if stale else None

    def _report(self, exc: BaseException) -> None:
        """Publish this rank's failure (first failing rank wins) and wait until the others read it."""
        first_line = (str(exc).strip().splitlines() or [""])[0]
        try:
            if self.store.add("failed", 1) == 1:
                self.store.set("message", f"rank {self.rank} failed: {type(exc).__name__}: {first_line}")
            deadline = time.monotonic() + self.grace_s
            while self.store.add("acks", 0) < self.world_size - 1 and time.monotonic() < deadline:
                self._beat()
                time.sleep(self.poll_s / 2)
        except (RuntimeError, OSError):
            pass  # the store is gone too; the original error still propagates

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            failure = self._read_failure()
            if failure is not None and failure.startswith(f"rank {self.rank} "):
                continue
            if failure is None:
                failure = self._silence()
                if failure is None:
                    continue
            else:
                try:
                    self.store.add("acks", 1)
                except (RuntimeError, OSError):
                    pass
            self.peer_failure = failure
            if self._unwound.wait(self.grace_s):
                return
            print(f"unison: error: {failure} (rank {self.rank} was stuck in a collective and exits)",
                  file=sys.stderr, flush=True)
            os._exit(1)
