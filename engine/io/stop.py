"""Stopping a render cleanly on SIGTERM or SIGUSR1 (preemption): every rank finishes the same
step, writes a step checkpoint there, and the CLI exits with 143; the same command resumes.

The handler only sets a flag (`StopRequest.signalled`); the loop asks `StopRequest.should_stop(done)`
at every step boundary. On one process the flag is the answer. With several ranks, only the rank
(or ranks) signalled know: the first to see its flag publishes `stop_at` in the rendezvous store
(compare_set, so the first value wins) and every rank reads the key at each boundary, one TCP
round trip on the host, no collective and no GPU synchronisation. A second signal ends the process
at once with 143. Every rank waits for the others' checkpoints before leaving the render, so a
launcher that signals the remaining ranks once one has exited never cuts a checkpoint short; and
the CLI keeps 143 for a signal that arrives after the render (signals_exit_143).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 143
"""128 + SIGTERM: what a shell reports for a process SIGTERM ended; here "preempted, resumable"."""

AHEAD = 2
"""Steps past the publishing rank's boundary at which every rank stops. Every step has
collectives over all the ranks (transitively: Ulysses, Ring, CFG and patch groups together span
the engine), so no rank can finish a step before every other rank has at least begun it: when a
rank publishes at boundary `done`, the others have finished at most `done + 1` steps (displaced
patches wait for an exchange a step later, which loosens the coupling by up to one step more
in the worst case, hence 2 and not 1). `done + 2` is therefore still ahead of every rank, and each
reads the key before reaching it."""


def exit_preempted(signum, frame) -> None:
    """End the process at once with 143 ("preempted, resumable"), not by the signal: a launcher
    (torchrun's agent, Slurm) reads a signal death as a crash. Whatever was committed is on disk;
    a commit under way removes its temporaries first (engine/io/writes.py takes the signal over)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_PREEMPTED)


def exit_143_until_the_end() -> None:
    """The CLI's entry point: SIGTERM and SIGUSR1 end this process with 143 from now until it exits
    (a render installs its own handlers meanwhile and gives these back)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, exit_preempted)


def ignore_signals_while_exiting() -> None:
    """The command is done and its exit code set: SIGTERM and SIGUSR1 are ignored from here. (Python's
    finalization puts Python-level handlers back to the default action, and a torch process can take
    a while to finalize: a launcher's signal landing then would read as a crash.)"""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def signals_exit_143() -> Iterator[None]:
    """For a command's whole life (the CLI's): SIGTERM and SIGUSR1 outside a render end the process
    with 143 too, so that every rank of a preempted torchrun job exits 143 whether the launcher's
    signal finds it inside its render (a clean stop) or past it (on its way out). Main thread only;
    the previous handlers come back on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    exit_143_until_the_end()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class StopRequest:
    """Asked at every step boundary whether the render stops there. `store` (None on one rank) is
    a store every rank of the engine shares; `key` names this render in it."""

    def __init__(self, store=None, *, key: str = "stop_at"):
        self.store, self.key = store, key
        self.signalled = False
        self.stop_at: int | None = None

    @classmethod
    def for_engine(cls, *, world_size: int, render: int) -> "StopRequest":
        """One rank: the flag alone. Several: the default process group's store, under a key per
        render (the engine's ranks count their renders alike)."""
        if world_size == 1:
            return cls()
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        return cls(dist.PrefixStore("unison/stop", _get_default_store()), key=f"render{render}")

    def should_stop(self, done: int) -> bool:
        """At the boundary after `done` steps: stop here?"""
        if self.store is None:
            return self.signalled
        if self.stop_at is None:
            if self.signalled:
                mine = str(done + AHEAD).encode()
                self.stop_at = int(self.store.compare_set(self.key, "", mine))
            elif self.store.check([self.key]):
                self.stop_at = int(self.store.get(self.key))
        return self.stop_at is not None and done >= self.stop_at

    @contextlib.contextmanager
    def on_signals(self) -> Iterator["StopRequest"]:
        """SIGTERM and SIGUSR1 set the flag while inside (main thread only; elsewhere signals
        cannot be handled and this does nothing); the previous handlers come back on leaving."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

        def handle(signum, frame) -> None:
            self.signalled = True
            for sig in SIGNALS:  # a second signal ends the process at once, with 143
                signal.signal(sig, exit_preempted)

        handle.deferred_stop = True  # engine/io/writes.py lets a commit under way finish
        for sig in SIGNALS:
            signal.signal(sig, handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
