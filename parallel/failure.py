"""A rank that fails ends the run on every rank, with an error naming it, instead of a hang.

Without this, the other ranks sit in their next collective until the process-group timeout
(minutes), and then report a timeout that does not say which rank broke. torchrun's agent kills
local siblings when a worker dies, but ranks launched by srun, Ray or on other nodes wait.

How: the failing rank writes "rank R: Error: message" under a key in the rendezvous store and
waits (briefly) until every other rank has read it. Each rank runs a watcher thread that polls
the key; when it appears, the watcher acknowledges it and gives the main thread a grace period
to unwind by itself (gloo raises once the failed rank's sockets close); if the main thread is
still stuck in a collective after that (NCCL), the watcher prints the error and ends the process.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

from unison.errors import PeerFailed


class FailureWatch:
    """Context manager around a rank's work; a no-op on one rank."""

    def __init__(self, store, *, rank: int, world_size: int, poll_s: float = 0.2, grace_s: float = 5.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.grace_s = poll_s, grace_s
        self.peer_failure: str | None = None
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
        return cls(dist.PrefixStore(f"unison/failure/{attempt}", client), rank=rank, world_size=world_size,
                   **kwargs)

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
        if exc is None:
            return False
        failure = self.peer_failure or self._read_failure()
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

    def _report(self, exc: BaseException) -> None:
        """Publish this rank's failure (first failing rank wins) and wait until the others read it."""
        first_line = (str(exc).strip().splitlines() or [""])[0]
        try:
            if self.store.add("failed", 1) == 1:
                self.store.set("message", f"rank {self.rank} failed: {type(exc).__name__}: {first_line}")
            deadline = time.monotonic() + self.grace_s
            while self.store.add("acks", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(self.poll_s / 2)
        except (RuntimeError, OSError):
            pass  # the store is gone too; the original error still propagates

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            failure = self._read_failure()
            if failure is None or failure.startswith(f"rank {self.rank} "):
                continue
            self.peer_failure = failure
            try:
                self.store.add("acks", 1)
            except (RuntimeError, OSError):
                pass
            if self._unwound.wait(self.grace_s):
                return
            print(f"unison: error: {failure} (rank {self.rank} was stuck in a collective and exits)",
                  file=sys.stderr, flush=True)
            os._exit(1)
