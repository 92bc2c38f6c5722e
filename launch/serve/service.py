"""The service behind the HTTP API: the job store, the queue, and the engines that take from it.

`Service` is the queue an engine driver takes jobs from (launch/ray_batch.JobQueue's protocol): the
local driver (one engine in this process, `LocalDriver`) and the Ray driver (`RayDriver`: K engines
of N ranks, each rebuilt when one of its ranks dies, as `unison batch --ray` does) are the same
loops a batch runs, fed while they run. Every attempt goes to the store's manifest through the
batch's Ledger, so a restarted server knows what is done, what failed and what to resume (from its
step checkpoint), as `unison batch` does when run again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from unison.engine.config import RunConfig
from unison.engine.errors import BatchPreempted, Preempted, UserError
from unison.engine.worker import Job, Progress
from unison.launch.batch import Batch, Ledger, error_text, retryable
from unison.launch.jobs import Manifest, Record, parse_object, resume
from unison.launch.ray_batch import JobQueue
from unison.launch.serve.requests import BadRequest, Request, Served
from unison.launch.serve.store import Entry, JobStore, new_id, now

log = logging.getLogger("unison")


@dataclass(frozen=True)
class Limits:
    max_queued_per_client: int = 32
    """Jobs one client may have queued or running; past it, 429."""
    max_queued: int = 1000
    """Jobs the server holds queued or running in all; past it, 429."""
    max_upload_bytes: int = 20 * 2**20
    """A request body's size (a picture upload); past it, 413."""


@dataclass
class Tracked:
    """What the service knows of one job (its status is derived from the manifest at start)."""

    entry: Entry
    job: Job | None
    """The validated job; None when it no longer validates (then it is failed)."""
    status: str = "queued"
    """queued, in_progress, completed or failed (OpenAI's names)."""
    error: str | None = None
    completed_at: int | None = None
    attempts: int = 0
    progress: Progress | None = None
    started: float | None = None
    """When its first step under this attempt was seen (monotonic), with the steps then finished."""
    started_finished: int = 0
    seen: float | None = None
    seen_finished: int = 0


class ServiceManifest(Manifest):
    """The store's manifest; each appended record also updates the service's view of the job."""

    def __init__(self, out_dir: Path, on_record: Callable[[Record], None]):
        super().__init__(out_dir)
        self.on_record = on_record

    def append(self, record: Record) -> None:
        super().append(record)
        self.on_record(record)


def percent(progress: Progress | None, status: str) -> int:
    """0-100 from the engine's phases: steps take 2-95, decoding 96, writing 98, done 100."""
    if status == "completed":
        return 100
    if progress is None or status != "in_progress":
        return 0
    if progress.phase in ("step", "checkpointing") and progress.steps:
        return 2 + int(93 * progress.finished / progress.steps)
    return {"decoding": 96, "writing": 98}.get(progress.phase, 1)


class Service(JobQueue):
    def __init__(self, *, base: RunConfig, store: JobStore, served: Served, limits: Limits, world_size: int,
                 max_retries: int = 2):
        super().__init__()
        self.base, self.store, self.served, self.limits = base, store, served, limits
        self.world_size, self.max_retries = world_size, max_retries
        self.lock = threading.RLock()
        self.wakeup = threading.Condition(self.lock)
        self.tracked: dict[str, Tracked] = {}
        self.queue: deque[str] = deque()
        self.withdrawn: set[str] = set()
        self.stopping = False
        self.seq = 0
        self.on_withdraw: Callable[[str], None] | None = None
        """The driver's way to stop a withdrawn running job at once (the local engine's cancel)."""
        self.engine_state = "starting"
        """starting, loading, ready or failed: the engines' state, for the page and the log."""
        self.ledger = self._restore()

    # -- start: what the store holds ----------------------------------------------------------
    def _validate(self, entry: Entry) -> Job:
        return parse_object({**entry.job, "id": entry.id}, 0, base=self.base, out_dir=self.store.dir,
                            world_size=self.world_size, folder=self.store.dir)

    def _restore(self) -> Ledger:
        entries = self.store.entries()
        swept = self.store.sweep(keep={e.id for e in entries})
        if swept:
            log.info("unison serve: removed what %d deleted jobs left", swept)
        manifest = ServiceManifest(self.store.dir, self._recorded)
        jobs, stale = [], []
        for entry in entries:
            try:
                job = self._validate(entry)
            except UserError as err:
                stale.append((entry, str(err)))
                job = None
            self.tracked[entry.id] = Tracked(entry=entry, job=job)
            if job is not None:
                jobs.append(job)
            self.seq = max(self.seq, entry.seq + 1)
        state = resume(jobs, manifest)
        last = {r.id: r for r in manifest.records()}
        for job_id, status in state.finished.items():
            t = self.tracked[job_id]
            t.status = "completed" if status == "done" else "failed"
            t.error = last[job_id].error if status == "failed" else None
            t.attempts = last[job_id].attempts
            if status == "done":
                t.completed_at = int(self.store.video(job_id).stat().st_mtime)
        for job in state.todo:
            self.queue.append(job.id)
            self.tracked[job.id].attempts = state.attempts.get(job.id, 0)
        batch = Batch(todo=state.todo, attempts=state.attempts, skipped=len(state.finished), total=len(jobs),
                      problems=[], history=state.history)
        ledger = Ledger(manifest, batch, max_retries=self.max_retries)
        for entry, message in stale:  # e.g. a server restarted with another model
            t = self.tracked[entry.id]
            t.status, t.error = "failed", f"UserError: {message}"
            if last.get(entry.id) is None or last[entry.id].status != "failed":
                ledger.failed_attempt(Job(id=entry.id, line=0, config=self.base), t.error, seconds=0.0, retry=False)
        if self.queue:
            log.info("unison serve: %d jobs to render from the store (checkpoints resume)", len(self.queue))
        return ledger

    # -- the HTTP side ------------------------------------------------------------------------
    def create(self, request: Request, *, client: str) -> Tracked:
        """Validate (as `unison generate` would), then write the job durably and queue it. The
        limits are checked first and again under the lock; a refused request leaves nothing."""
        self._check_room(client)
        job_id = new_id()
        job = dict(request.job)
        if request.picture is not None:
            self.store.put_picture(job_id, request.picture)
            job["image"] = f"inputs/{job_id}.png"
        entry = Entry(id=job_id, created_at=now(), seq=0, client=client, job=job, seconds=request.seconds,
                      size=request.size)
        try:
            validated = self._validate(entry)
            with self.lock:
                self._check_room(client)
                entry = dataclasses.replace(entry, seq=self.seq)
                self.store.accept(entry)
                self.seq += 1
                tracked = self.tracked[job_id] = Tracked(entry=entry, job=validated)
                self.queue.append(job_id)
                self.wakeup.notify_all()
        except UserError as err:
            self.store.picture(job_id).unlink(missing_ok=True)
            raise BadRequest(str(err)) from None
        except BaseException:
            self.store.picture(job_id).unlink(missing_ok=True)
            raise
        log.info("unison serve: accepted %s (%d queued)", job_id, len(self.queue))
        return tracked

    def _check_room(self, client: str) -> None:
        with self.lock:
            if self.stopping:
                raise BadRequest("the server is shutting down; try again shortly", status=503, code="shutting_down",
                                 type="server_error")
            if self.engine_state == "failed":
                raise BadRequest("the engine failed to start (see the server's log); no job can render", status=503,
                                 code="engine_failed", type="server_error")
            pending = [t for t in self.tracked.values() if t.status in ("queued", "in_progress")]
            if len(pending) >= self.limits.max_queued:
                raise BadRequest(f"the server holds {len(pending)} unfinished jobs, its limit; try again later",
                                 status=429, code="queue_full", type="rate_limit_error")
            own = sum(1 for t in pending if t.entry.client == client)
            if own >= self.limits.max_queued_per_client:
                raise BadRequest(f"you have {own} unfinished jobs, the limit per client; try again when one is done",
                                 status=429, code="too_many_queued", type="rate_limit_error")

    def get(self, job_id: str) -> Tracked | None:
        with self.lock:
            return self.tracked.get(job_id)

    def page(self, *, after: str | None, limit: int, order: str) -> tuple[list[Tracked], bool]:
        with self.lock:
            items = sorted(self.tracked.values(), key=lambda t: t.entry.seq, reverse=order == "desc")
        if after is not None:
            index = next((i for i, t in enumerate(items) if t.entry.id == after), None)
            if index is None:
                raise BadRequest(f"'after': no video {after[:60]!r}", param="after")
            items = items[index + 1:]
        return items[:limit], len(items) > limit

    def delete(self, job_id: str) -> bool:
        """Remove a job: a queued one leaves the queue, a running one stops at the next step on
        every rank (the preemption path) and its files go once its engine lets go, a finished
        one's files go now. False: no such job."""
        with self.lock:
            tracked = self.tracked.pop(job_id, None)
            if tracked is None:
                return False
            running = tracked.status == "in_progress"
            if job_id in self.queue:
                self.queue.remove(job_id)
            if running:
                self.withdrawn.add(job_id)
            self.store.remove(job_id, rendering=running)
        if running and self.on_withdraw is not None:
            self.on_withdraw(job_id)
        log.info("unison serve: deleted %s%s", job_id, " (stopping its render)" if running else "")
        return True

    def position(self, job_id: str) -> int | None:
        with self.lock:
            try:
                return self.queue.index(job_id)
            except ValueError:
                return None

    def eta(self, tracked: Tracked) -> float | None:
        """Seconds left, from the pace of the steps seen so far under this attempt (None before two
        reports of finished steps)."""
        p = tracked.progress
        if tracked.status != "in_progress" or p is None or tracked.started is None or tracked.seen is None:
            return None
        done = tracked.seen_finished - tracked.started_finished
        if done <= 0:
            return None
        per_step = (tracked.seen - tracked.started) / done
        return round(per_step * max(0, p.steps - p.finished), 1)

    # -- the driver side (JobQueue) ------------------------------------------------------------
    def take(self) -> Job | None:
        with self.lock:
            while self.queue and not self.stopping:
                job_id = self.queue.popleft()
                tracked = self.tracked.get(job_id)
                if tracked is None or tracked.job is None:
                    continue
                tracked.status, tracked.progress, tracked.started, tracked.seen = "in_progress", None, None, None
                return tracked.job
            return None

    def wait(self, timeout: float) -> None:
        with self.lock:
            if not self.queue and not self.stopping:
                self.wakeup.wait(timeout)

    def put_back(self, job: Job) -> None:
        with self.lock:
            tracked = self.tracked.get(job.id)
            if tracked is not None and job.id not in self.queue:
                tracked.status, tracked.progress = "queued", None
                self.queue.appendleft(job.id)

    def open(self) -> bool:
        return not self.stopping

    def __len__(self) -> int:
        return len(self.queue)

    def dropped(self, job_id: str) -> bool:
        with self.lock:
            return job_id in self.withdrawn

    def released(self, job: Job) -> None:
        with self.lock:
            self.withdrawn.discard(job.id)
        self.store.leftovers(job.id)

    def observe(self, progress: Progress | None) -> None:
        """An engine's report of its job (every phase and step locally; each turn of the Ray loop)."""
        if progress is None or progress.job is None:
            return
        with self.lock:
            tracked = self.tracked.get(progress.job)
            if tracked is None or tracked.status != "in_progress":
                return
            tracked.progress = progress
            if progress.phase == "step" or progress.phase == "checkpointing":
                clock = time.monotonic()
                if tracked.started is None:
                    tracked.started, tracked.started_finished = clock, progress.finished
                if progress.finished != tracked.seen_finished or tracked.seen is None:
                    tracked.seen, tracked.seen_finished = clock, progress.finished

    def _recorded(self, record: Record) -> None:
        """A record the ledger appended (in the driver's thread). A done video's thumbnail is made
        when first asked for (the content route), not here: the engine's next job waits for nothing."""
        with self.lock:
            tracked = self.tracked.get(record.id)
            if tracked is None:  # deleted as it finished
                self.store.leftovers(record.id)
                return
            tracked.attempts = record.attempts
            if record.status == "done":
                tracked.status, tracked.completed_at, tracked.error = "completed", now(), None
            elif record.status == "failed":
                tracked.status, tracked.error = "failed", record.error
        log.info("unison serve: %s %s%s", record.id, record.status, f" ({record.error})" if record.error else "")

    def stop(self) -> None:
        """No job starts after this; the drivers stop the running ones at a step checkpoint."""
        with self.lock:
            self.stopping = True
            self.wakeup.notify_all()

    def counts(self) -> dict[str, int]:
        with self.lock:
            out = {status: 0 for status in ("queued", "in_progress", "completed", "failed")}
            for tracked in self.tracked.values():
                out[tracked.status] += 1
            return out


class LocalDriver(threading.Thread):
    """One engine: this process alone, or rank 0 of a torchrun world (`control`: a gloo group of
    every rank, over which each job, or an idle beat, or the end, is broadcast to the ranks that
    `follow`). Builds the engine, then renders what the service queues. On one rank a job that
    fails is retried in place (its step checkpoint resumes it) until its retries are used; with
    several ranks a failure may leave a collective half-done, so the attempt is recorded and the
    server ends (`on_fatal`): torchrun --max-restarts starts it again, and it resumes."""

    def __init__(self, service: Service, plan, *, control=None, on_fatal: Callable[[], None] | None = None):
        super().__init__(name="unison-engine", daemon=True)
        self.service, self.plan, self.control, self.on_fatal = service, plan, control, on_fatal
        self.worker = None
        self.error: BaseException | None = None

    def _tell(self, command) -> None:
        """Every rank of a torchrun world gets the same command (rank 0 sends it)."""
        if self.control is not None:
            import torch.distributed as dist

            dist.broadcast_object_list([command], src=0, group=self.control)

    def _withdraw(self, job_id: str) -> None:
        worker = self.worker
        if worker is not None:
            worker.cancel(job_id)

    def run(self) -> None:
        from unison.engine.worker import Worker

        service = self.service
        service.on_withdraw = self._withdraw
        try:
            service.engine_state = "loading"
            self.worker = Worker(self.plan)
            service.engine_state = "ready"
            log.info("unison serve: engine ready (%s)", self.plan.config.model.family)
            while service.open():
                job = service.take()
                if job is None:
                    service.wait(0.5)
                    self._tell(None)  # the other ranks wait in the broadcast: a beat each half second
                    continue
                self._tell(job)
                self._render(job)
            self._tell(STOP)
        except BaseException as err:  # noqa: BLE001 - reported; alone, the server stays up and says so
            self.error = err
            service.engine_state = "failed"
            log.error("unison serve: the engine failed: %s", error_text(err))
            if self.control is not None and self.on_fatal is not None:
                self.on_fatal()

    def _render(self, job: Job) -> None:
        service, worker, ledger = self.service, self.worker, self.service.ledger

        def report(progress: Progress) -> None:
            service.observe(progress)
            if service.dropped(job.id):  # withdrawn before the worker had the job: stop now
                worker.cancel(job.id)

        started = time.perf_counter()
        try:
            outcome = worker.run(job, on_progress=report)
        except Preempted as err:
            if service.dropped(job.id):
                service.released(job)
            else:
                ledger.preempted(job, error_text(err), seconds=time.perf_counter() - started, reached=worker.attempt())
                if not service.stopping:
                    service.put_back(job)
            return
        except Exception as err:  # noqa: BLE001 - recorded; retried when another attempt could succeed
            if service.dropped(job.id):
                service.released(job)
                return
            again = ledger.failed_attempt(job, error_text(err), seconds=time.perf_counter() - started,
                                          retry=retryable(err), reached=worker.attempt())
            if self.control is not None:
                raise  # a collective may be half-done: the world ends, and a restart resumes
            if again:
                service.put_back(job)
            return
        if service.dropped(job.id):
            service.released(job)
            return
        ledger.succeeded(job, seconds=outcome.seconds, steps=outcome.steps, step_seconds=outcome.step_seconds,
                         resumed_from_step=outcome.resumed_from_step, windows=outcome.windows)

    def stop(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.request_stop()


STOP = "stop"
"""What rank 0 broadcasts when the server stops."""


def follow(plan, control) -> None:
    """A torchrun rank other than 0: render every job rank 0 broadcasts, until it says stop. Its
    outcomes are rank 0's to record (every rank stops at the same step, fails together)."""
    import torch.distributed as dist

    from unison.engine.worker import Worker

    worker = Worker(plan)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        command = box[0]
        if command == STOP:
            return
        if isinstance(command, Job):
            try:
                worker.run(command)
            except Preempted:
                continue  # a cancel or the server's stop: rank 0 records it and says what comes next


class RayDriver(threading.Thread):
    """K engines of N ranks on Ray (launch/ray_batch.py), fed by the service."""

    def __init__(self, service: Service, config: RunConfig, options):
        super().__init__(name="unison-ray", daemon=True)
        from unison.launch.ray_batch import RayBatch

        service_ = service

        class Fed(RayBatch):
            def _bring_up(self, slot) -> bool:
                up = super()._bring_up(slot)
                if up:
                    service_.engine_state = "ready"
                return up

            def _show(self, slots, bars) -> None:
                super()._show(slots, bars)
                for slot in slots:
                    service_.observe(slot.state)

        self.service = service
        self.batch = Fed(config, options)
        self.error: BaseException | None = None

    def run(self) -> None:
        self.service.engine_state = "loading"
        try:
            self.batch.run(self.service, self.service.ledger)
        except BatchPreempted:
            pass  # the service stopped: the running jobs are recorded preempted
        except BaseException as err:  # noqa: BLE001 - reported; the server stays up and says so
            self.error = err
            self.service.engine_state = "failed"
            log.error("unison serve: the Ray engines failed: %s", error_text(err))

    def stop(self) -> None:
        self.batch.stop()


def video_object(service: Service, tracked: Tracked) -> dict[str, Any]:
    """A job as OpenAI's Video object, with unison's own fields beside (phase, step, steps, ETA,
    queue position, attempts)."""
    entry, progress = tracked.entry, tracked.progress
    in_progress = tracked.status == "in_progress" and progress is not None
    obj: dict[str, Any] = {
        "id": entry.id, "object": "video", "created_at": entry.created_at, "status": tracked.status,
        "model": service.served.model, "progress": percent(progress, tracked.status), "seconds": entry.seconds,
        "size": entry.size, "prompt": entry.job.get("prompt"), "completed_at": tracked.completed_at,
        "expires_at": None, "remixed_from_video_id": None,
        "error": {"code": "render_failed", "message": tracked.error} if tracked.status == "failed" else None,
        "phase": (progress.phase if in_progress else tracked.status),
        "step": progress.step if in_progress and progress.phase == "step" else None,
        "steps": (tracked.job.config.sampling.steps if tracked.job is not None else None),
        "eta_seconds": service.eta(tracked), "queue_position": service.position(entry.id),
        "attempts": tracked.attempts,
    }
    if in_progress and progress.window is not None:
        obj["window"] = list(progress.window)
    return obj
