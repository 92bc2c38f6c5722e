"""`unison batch`: render a JSONL file of jobs into a folder, resumably.

What every driver shares lives here: reading and resuming the batch (`prepare`), recording each
attempt in the manifest and deciding retries (`Ledger`), the end-of-batch summary. The local
driver (`run_local`) serves a single process and torchrun, where all ranks are one engine and run
the jobs in file order; the Ray driver (launch/ray_batch.py) spreads jobs over several engines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from unison.engine.targets import check_batch_output
from unison.engine.config import RunConfig
from unison.launch.jobs import Job, Manifest, Problem, Record, clean_partial_files, read_jobs, recomputed, resume
from unison.engine.worker import Progress
from unison.engine.io.writes import failure_reason
from unison.caching.agree import CacheDisagreement
from unison.engine.errors import PeerFailed, Preempted, RenderFailed, UserError, WriteFailed

log = logging.getLogger("unison")


@dataclass(frozen=True)
class Batch:
    todo: list[Job]
    attempts: dict[str, int]
    """Attempts already recorded per job still to render."""
    skipped: int
    """Jobs already finished by an earlier run."""
    total: int
    problems: list[Problem]
    history: dict[str, list[Record]] = field(default_factory=dict)
    """Earlier runs' records of the jobs in `todo`."""


def prepare(jobs_path: str | Path, out_dir: str | Path, *, base: RunConfig, world_size: int,
            lock: contextlib.ExitStack | None = None, reads: dict[str, str] | None = None) -> Batch:
    """Read and validate the jobs, report bad lines on stderr, remove a killed run's temporary
    files, and resume from the manifest. With `lock`, the folder's OutputLock is taken into it
    once the input has been checked (a refused run writes nothing) and before the first write."""
    out_dir = Path(out_dir).resolve()  # Ray actors and other nodes see the same absolute paths
    check_batch_output(out_dir, base)
    jobs, problems = read_jobs(jobs_path, base=base, out_dir=out_dir, world_size=world_size, reads=reads)
    if lock is not None and jobs:
        Manifest(out_dir).records()  # a manifest that is not one is refused before the lock file is made
        lock.enter_context(OutputLock(out_dir))
    for problem in problems:
        print(f"unison: {jobs_path}: {problem} (skipped)", file=sys.stderr)
    if not jobs:
        raise UserError(f"{jobs_path}: no valid job to render")
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_partial_files(out_dir)
    state = resume(jobs, Manifest(out_dir))
    return Batch(todo=state.todo, attempts=state.attempts, skipped=len(state.finished), total=len(jobs),
                 problems=problems, history=state.history)


LOCK = ".unison.lock"


class OutputLock:
    """An exclusive `flock` on DIR/.unison.lock for the life of a batch, held by the process that
    owns the manifest (the single process, rank 0 under torchrun, the Ray driver). A second batch
    on the same folder would render every job again, append duplicate records and delete the first
    one's temporary files; it gets a UserError naming the holder instead (error, not cooperation).
    The kernel drops the lock with its process, so a killed run never blocks the next one."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {self.path.parent}: cannot create the folder ({err.strerror or err})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"{self.path}: cannot open the batch's lock file ({err.strerror or err})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UserError(f"{self.path}: cannot lock the batch's folder ({err.strerror or err})") from None
                raise UserError(f"--out {self.path.parent} is in use by another batch ({holder}); wait for it to "
                                f"end or pick another folder") from None
            # The holder before us removes the file as it lets go: if we locked that unlinked file,
            # a third run could lock a new one beside us, so lock again until the path is ours.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:  # a full disk: we hold the lock, so the file is ours to remove
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise WriteFailed(f"could not write {self.path}: {failure_reason(err)}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: nobody holds the file we remove
            os.close(self._fd)
            self._fd = None


@dataclass
class Ledger:
    """Records attempts in the manifest and keeps the batch's tally (the driver's side only)."""

    manifest: Manifest | None
    """None: nothing recorded (a single `generate --ray` video)."""
    batch: Batch
    max_retries: int
    progress: bool = False
    attempts: dict[str, int] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    retries: int = 0
    step_seconds: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.attempts = dict(self.batch.attempts)
        self.records: list[Record] = [r for records in self.batch.history.values() for r in records]
        """The records of every job this run touches, earlier runs' included (for `recomputed`)."""
        self.bar = tqdm(total=self.batch.total, initial=self.batch.skipped, desc="batch", unit="job",
                        disable=not self.progress, dynamic_ncols=True)

    def attempt(self, job: Job) -> int:
        """The number of the attempt about to start (1 for a fresh job)."""
        return self.attempts.get(job.id, 0) + 1

    def succeeded(self, job: Job, *, seconds: float, steps: int, step_seconds: float,
                  resumed_from_step: int = 0, windows: int = 0) -> None:
        number = self.attempt(job)
        self.attempts[job.id] = number
        self._append(Record(id=job.id, status="done", attempts=number, seconds=round(seconds, 3),
                            steps=steps, step_seconds=round(step_seconds, 4), resumed_from_step=resumed_from_step,
                            windows=windows))
        self.done += 1
        self.step_seconds.append(step_seconds)
        self.bar.update(1)

    def failed_attempt(self, job: Job, error: str, *, seconds: float, retry: bool = True,
                       reached: Progress | None = None) -> bool:
        """Record a failed attempt; True when the job should run again. `retry=False` (an error
        the same input brings back, see `retryable`) records it failed at once. `reached`: the
        attempt's last progress (where it started, how many steps it finished), when known."""
        number = self.attempt(job)
        self.attempts[job.id] = number
        again = retry and number <= self.max_retries
        self._append(Record(id=job.id, status="retry" if again else "failed", attempts=number,
                            seconds=round(seconds, 3), error=error, **_span(job, reached)))
        if again:
            self.retries += 1
            log.warning("job %s failed (attempt %d, retrying): %s", job.id, number, error)
        else:
            self.failed += 1
            self.bar.update(1)
            log.warning("job %s failed after %d attempts%s: %s", job.id, number,
                        "" if retry else " (not retried: the same input fails the same way)", error)
        return again

    def preempted(self, job: Job, error: str, *, seconds: float, reached: Progress | None = None) -> None:
        """Record an attempt stopped by SIGTERM/SIGUSR1 (Preempted): neither done nor failed. It uses
        up no attempt (the record names its number; the next run gives that number again), and the
        next run resumes the job from its step checkpoint."""
        self._append(Record(id=job.id, status="preempted", attempts=self.attempt(job),
                            seconds=round(seconds, 3), error=error, **_span(job, reached)))
        log.warning("job %s preempted: %s", job.id, error)

    def show(self, progress) -> None:
        """The engine's phase beside the batch bar: "job cat, decoding" (a worker's Progress)."""
        self.bar.set_postfix_str(progress.describe(), refresh=True)

    def _append(self, record: Record) -> None:
        self.records.append(record)
        if self.manifest is not None:
            self.manifest.append(record)

    def summary(self) -> str:
        hours = (time.perf_counter() - self.started) / 3600
        rate = f"{self.done / hours:.0f} videos/hour" if hours > 0 else "-"
        step = f"{statistics.median(self.step_seconds):.3f} s/step (median)" if self.step_seconds else "no steps"
        return (f"batch     {self.batch.total} jobs: {self.done} done, {self.failed} failed, {self.retries} "
                f"retries, {self.batch.skipped} already finished, {len(self.batch.problems)} bad lines skipped; "
                f"{recomputed(self.records)} steps recomputed after faults; {hours * 3600:.1f} s, {rate}, {step}"
                + (f"; manifest {self.manifest.path}" if self.manifest is not None else ""))

    def close(self) -> None:
        self.bar.close()


def _span(job: Job, reached: Progress | None) -> dict[str, int]:
    """A stopped attempt's Record fields: the step it started from and the steps it finished."""
    if reached is None or reached.job != job.id:
        return {}
    span = {"resumed_from_step": reached.first, "steps": max(0, reached.finished - reached.first)}
    if reached.window is not None:  # diffusion forcing: the windows before the one under way are done
        span["windows"] = reached.window[0] - 1
    return span


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:500]


NOT_RETRIED: tuple[type[BaseException], ...] = (
    UserError, RenderFailed, CacheDisagreement, ValueError, TypeError, KeyError, IndexError, AttributeError,
    NotImplementedError, AssertionError, ArithmeticError, ImportError, RecursionError)
"""Errors that the same job brings back on every attempt: a bad value found only while rendering
(UserError), latents gone NaN (NonFiniteLatents, a RenderFailed), ranks deciding differently
(CacheDisagreement), and the errors of code handed values it cannot take."""


def _not_retried_names() -> set[str]:
    names, classes = set(), list(NOT_RETRIED)
    while classes:
        cls = classes.pop()
        names.add(cls.__name__)
        classes.extend(cls.__subclasses__())
    return names


def retryable(err: BaseException) -> bool:
    """Could another attempt of the job succeed? Not retried: NOT_RETRIED. Retried: running out
    of memory (GPU or host), a lost peer or a timed-out collective, an OSError (a write, a network
    file system), and every error not named there (CUDA and NCCL faults come as plain
    RuntimeErrors). A peer's failure (PeerFailed) is judged by the error it names."""
    if isinstance(err, PeerFailed):
        named = re.match(r"rank \d+ failed: (\w+)", str(err))
        return named is None or named.group(1) not in _not_retried_names()
    return isinstance(err, (OSError, MemoryError)) or not isinstance(err, NOT_RETRIED)


def run_local(ledger: Ledger | None, todo: list[Job], *, worker) -> None:
    """Run `todo` in order on `worker` (all ranks of one engine call this with the same list; only
    rank 0 holds the ledger). On one rank a failed job is retried in place. With several ranks a
    failure may leave a collective half-done, so the attempt is recorded and the batch ends; the
    same command (or torchrun --max-restarts) resumes it. So does a failed write (WriteFailed: a
    full disk, a quota, a file-size limit): the next job would fail the same way and use up its
    attempts, so the attempt is recorded (never as done) and the batch ends; run again to resume.
    So does a preemption (Preempted: SIGTERM or SIGUSR1, every rank checkpointed the same step),
    recorded `preempted`: the CLI exits 143, and the same command resumes the job from its checkpoint."""
    for job in todo:
        while True:
            started = time.perf_counter()
            try:
                outcome = worker.run(job, on_progress=ledger.show if ledger is not None else None)
            except Preempted as err:
                if ledger is not None:
                    ledger.preempted(job, error_text(err), seconds=time.perf_counter() - started,
                                     reached=worker.attempt())
                raise
            except Exception as err:
                if ledger is None:
                    raise
                again = ledger.failed_attempt(job, error_text(err), seconds=time.perf_counter() - started,
                                              retry=retryable(err), reached=worker.attempt())
                if worker.engine.plan.world_size > 1 or isinstance(err, WriteFailed):
                    raise
                if again:
                    continue
                break
            if ledger is not None:
                ledger.succeeded(job, seconds=outcome.seconds, steps=outcome.steps,
                                 step_seconds=outcome.step_seconds, resumed_from_step=outcome.resumed_from_step,
                                 windows=outcome.windows)
            break
