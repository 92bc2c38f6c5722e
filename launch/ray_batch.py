"""The Ray driver: K engines of N ranks each, jobs handed out as engines free up.

Ray only starts processes and carries calls; the collectives stay in torch.distributed. Each
engine is a placement group of N bundles (one GPU each on a GPU cluster, one CPU each otherwise)
with one actor per bundle. The actors are ordered by node before ranks are given out, so
consecutive ranks (Ulysses groups) share a node; rank 0's actor picks a free port on its node and
every actor joins a torch.distributed group of its own engine with a tcp:// rendezvous there
(NCCL on GPUs, gloo on CPUs), then loads the model once.

Faults: a job that raises, or an actor that dies, takes its engine down (every rank: a failure
can leave a collective half-done) and the engine is rebuilt; the job goes back to the front of
the queue until it has used its retries, then it is marked failed. Ctrl-C kills the actors; the
manifest then holds every finished job and the same command resumes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from unison.engine.io import faults
from unison.engine.config import RunConfig
from unison.launch.jobs import Job
from unison.engine.io.stop import StopRequest
from unison.engine.worker import Progress
from unison.engine.errors import BatchPreempted, Preempted, UserError, WriteFailed
from unison.launch.batch import Ledger, error_text, retryable

log = logging.getLogger("unison")

FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TOKENIZERS_PARALLELISM", "HF_HOME")
"""Driver environment variables the rank actors get too (network interface choices, caches)."""
MAX_REBUILDS = 3
"""An engine that fails to come up this many times in a row is given up."""


class RankActor:
    """One rank of one engine (a Ray actor; two concurrent calls so progress can be read mid-job)."""

    def node(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, *, rank: int, world_size: int, address: str, port: int, config: RunConfig,
              env: dict[str, str], threads: int | None) -> bool:
        import torch

        from unison.engine.plan import plan_run
        from unison.engine.worker import Worker
        from unison.launch.dist import DistEnv

        os.environ.update(env)
        if threads is not None:  # CPU bundles: as many threads as the bundle has cores
            torch.set_num_threads(threads)
        # Ray gives each actor its own GPU as device 0 (CUDA_VISIBLE_DEVICES), hence local_rank 0.
        from unison.launch.runs import engine_config

        plan = plan_run(engine_config(config), world_size=world_size, local_rank=0)
        DistEnv(rank=rank, world_size=world_size, local_rank=0, master_addr=address, master_port=port,
                source="ray").init(timeout_s=config.parallel.timeout_s, placement=plan.placement)
        self.worker = Worker(plan)
        return True

    def run(self, job: Job):
        return self.worker.run(job)

    def progress(self):
        worker = getattr(self, "worker", None)
        return worker.progress() if worker is not None else None

    def attempt(self):
        """Where the last job started and how far it got (read after it failed)."""
        worker = getattr(self, "worker", None)
        return worker.attempt() if worker is not None else None

    def request_stop(self) -> None:
        """The driver was told to stop: end the job under way at a checkpoint (Preempted)."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.request_stop()

    def cancel(self, job_id: str) -> None:
        """A service's delete: stop `job_id` if it is under way here (Worker.cancel)."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.cancel(job_id)


def engine_line(index: int, job: str | None, state: Progress | None) -> str:
    """One engine's progress line: "engine 1: job cat, decoding", "engine 0: idle". `job` is the
    driver's job on the engine, `state` rank 0's Progress (None when it could not be read); a state
    that is not yet of that job (the call has not reached the actor) shows the job alone."""
    if state is not None and state.job == job:
        return f"engine {index}: {state.describe()}"
    return f"engine {index}: " + (f"job {job}" if job is not None else "idle")


LOADING = Progress(job=None, step=0, steps=0, phase="loading")


def rank_order(nodes: list[str]) -> list[int]:
    """Bundle indices in rank order: grouped by node (nodes in order of first appearance), bundle
    order kept inside a node, so consecutive ranks share a node whenever they can."""
    first = {node: i for i, node in reversed(list(enumerate(nodes)))}
    return sorted(range(len(nodes)), key=lambda i: (first[nodes[i]], i))


@dataclass
class EngineSlot:
    index: int
    actors: list = field(default_factory=list)
    """Rank-ordered actors."""
    group: object = None
    job: Job | None = None
    refs: list = field(default_factory=list)
    started: float = 0.0
    failures_in_row: int = 0
    stop_sent: bool = False
    state: Progress | None = None
    """Rank 0's last progress report of the job under way (read each turn of the driver's loop)."""


class JobQueue:
    """The jobs a driver hands out: a batch's list, in order (this class), or a service's queue,
    which grows while the driver runs (launch/serve/service.py) and may drop a running job."""

    def __init__(self, jobs=()):
        self._jobs = deque(jobs)

    def take(self) -> Job | None:
        """The next job to start, or None when there is none now."""
        return self._jobs.popleft() if self._jobs else None

    def put_back(self, job: Job) -> None:
        """A job to run again (a retry, a resume after preemption) goes first."""
        self._jobs.appendleft(job)

    def open(self) -> bool:
        """May a job still come? A batch: while its list is not empty; a service: until it stops."""
        return bool(self._jobs)

    def dropped(self, job_id: str) -> bool:
        """Was this running job withdrawn (a service's delete)? Then it stops, and is not recorded."""
        return False

    def released(self, job: Job) -> None:
        """A withdrawn job has left its engine (stopped, failed or even finished): what it left
        behind may go."""

    def __len__(self) -> int:
        return len(self._jobs)


@dataclass
class RayOptions:
    engines: int
    ranks_per_engine: int
    gpus: bool
    cpus_per_rank: float = 1.0
    setup_timeout_s: float = 600.0


def options_for_cluster(*, engines: int | None, ranks_per_engine: int) -> RayOptions:
    """Engines from the flag, else as many as the cluster's GPUs hold (one engine on a CPU cluster)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if engines is None:
        engines = max(1, gpus // ranks_per_engine) if gpus else 1
    if engines < 1:
        raise UserError(f"--engines must be at least 1, got {engines}")
    kind, have = ("GPUs", gpus) if gpus else ("CPUs", cpus)
    if engines * ranks_per_engine > have:
        raise UserError(f"{engines} engines x {ranks_per_engine} ranks need {engines * ranks_per_engine} {kind}; "
                        f"the Ray cluster has {have}")
    return RayOptions(engines=engines, ranks_per_engine=ranks_per_engine, gpus=gpus > 0)


class RayBatch:
    """Drives the engines. `on_start(slot, job)` is called when a job starts (tests use it to
    kill an actor mid-job)."""

    def __init__(self, config: RunConfig, options: RayOptions, *, progress: bool = False,
                 on_start: Callable[[EngineSlot, Job], None] | None = None):
        import ray

        self.ray, self.config, self.options, self.progress = ray, config, options, progress
        self.on_start = on_start
        bundle = {"GPU": 1, "CPU": options.cpus_per_rank} if options.gpus else {"CPU": options.cpus_per_rank}
        self.bundle = bundle
        self.actor_class = ray.remote(num_cpus=options.cpus_per_rank, num_gpus=1 if options.gpus else 0,
                                      max_concurrency=2)(RankActor)
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} | faults.forwarded_env()
        self.threads = None if options.gpus else max(1, int(options.cpus_per_rank))
        self.bars: list = []
        self.stopping = False
        """SIGTERM or SIGUSR1 reached the driver: no job starts, the running ones checkpoint."""
        self.preempted: list[str] = []
        self.signalled = StopRequest()

    # -- engines ----------------------------------------------------------------------------------
    def _start(self, slot: EngineSlot) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, n = self.ray, self.options.ranks_per_engine
        slot.group = placement_group([dict(self.bundle) for _ in range(n)], strategy="PACK")
        ray.get(slot.group.ready(), timeout=self.options.setup_timeout_s)
        actors = [self.actor_class.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            slot.group, placement_group_bundle_index=i)).remote() for i in range(n)]
        nodes = ray.get([a.node.remote() for a in actors], timeout=self.options.setup_timeout_s)
        order = rank_order([node_id for node_id, _ in nodes])
        slot.actors = [actors[i] for i in order]
        address = nodes[order[0]][1]
        port = ray.get(slot.actors[0].free_port.remote())
        ray.get([a.setup.remote(rank=r, world_size=n, address=address, port=port, config=self.config,
                                env=self.env, threads=self.threads)
                 for r, a in enumerate(slot.actors)], timeout=self.options.setup_timeout_s)

    def _stop(self, slot: EngineSlot) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in slot.actors:
            self.ray.kill(actor, no_restart=True)
        if slot.group is not None:
            remove_placement_group(slot.group)
        slot.actors, slot.group, slot.job, slot.refs, slot.stop_sent, slot.state = [], None, None, [], False, None

    def _bring_up(self, slot: EngineSlot) -> bool:
        if self.progress and self.bars:
            self.bars[slot.index].set_description_str(engine_line(slot.index, None, LOADING))
        while slot.failures_in_row < MAX_REBUILDS:
            try:
                self._start(slot)
                return True
            except Exception as err:  # noqa: BLE001 - any start failure: clean up and try again
                slot.failures_in_row += 1
                log.warning("engine %d failed to start (%d of %d): %s", slot.index, slot.failures_in_row,
                            MAX_REBUILDS, error_text(err))
                self._stop(slot)
        return False

    # -- the queue --------------------------------------------------------------------------------
    def run(self, todo: list[Job] | JobQueue, ledger: Ledger) -> None:
        """Render `todo`. SIGTERM or SIGUSR1 (main thread; a second one ends the driver at once):
        no further job starts, every running job stops at a step checkpoint and is recorded
        preempted, the engines go down, and BatchPreempted is raised (the CLI exits 143; the same
        command resumes). A job whose write failed (WriteFailed) ends the batch the same way the
        local driver does: the next job would fail alike."""
        with self.signalled.on_signals():
            self._run(todo if isinstance(todo, JobQueue) else JobQueue(todo), ledger)
        if self.stopping:
            raise BatchPreempted(self.preempted)

    def stop(self) -> None:
        """What SIGTERM does, from another thread (a service shutting down)."""
        self.signalled.signalled = True

    def _run(self, queue: JobQueue, ledger: Ledger) -> None:
        slots = [EngineSlot(index=i) for i in range(self.options.engines)]
        bars = self.bars = [tqdm(total=0, position=i + 1, bar_format="{desc}", disable=not self.progress,
                                 leave=False) for i in range(len(slots))]
        live = []
        try:
            for slot in slots:
                if self._stopped() or self._bring_up(slot):
                    live.append(slot)
            live = [s for s in live if s.actors]
            if not live and not self.stopping:
                raise RuntimeError("no engine could be started; see the warnings above")
            while (queue.open() and not self.stopping) or any(s.job is not None for s in live):
                for slot in live:
                    job = queue.take() if slot.job is None and not self._stopped() else None
                    if job is not None:
                        self._assign(slot, job)
                busy = [s for s in live if s.job is not None]
                for slot in busy:
                    if self._stopped():
                        self._send_stop(slot)
                    elif queue.dropped(slot.job.id):
                        self._send_stop(slot, only=slot.job.id)
                refs = [r for s in busy for r in s.refs]
                if refs:
                    self.ray.wait(refs, num_returns=1, timeout=0.5)
                else:
                    time.sleep(0.1)  # a service's idle engines: poll its queue
                for slot in busy:
                    self._collect(slot, queue, ledger)
                live = [s for s in live if s.actors]
                if not live and queue.open() and not self.stopping:
                    raise RuntimeError(f"every engine failed; {len(queue)} jobs were not rendered "
                                       "(the same command resumes them)")
                self._show(live, bars)
        finally:
            for bar in bars:
                bar.close()
            for slot in slots:
                if slot.actors:
                    self._stop(slot)

    def _stopped(self) -> bool:
        if self.signalled.signalled and not self.stopping:
            self.stopping = True
            log.warning("stopping: the running jobs checkpoint at their next step; no new job starts")
        return self.stopping

    def _send_stop(self, slot: EngineSlot, *, only: str | None = None) -> None:
        """Stop the engine's job at a checkpoint; `only`: a withdrawn job's id (the stop then
        reaches no later job, should it land after this one ended; it is asked again each turn, as
        it may come before the job has reached the ranks)."""
        if only is not None:
            for actor in slot.actors:
                actor.cancel.remote(only)
        elif not slot.stop_sent:
            slot.stop_sent = True
            for actor in slot.actors:  # any rank's request stops them all; each is asked in case one is gone
                actor.request_stop.remote()

    def _reached(self, slot: EngineSlot):
        """The stopped attempt's progress from any rank still alive (they step in lockstep)."""
        for actor in slot.actors:
            try:
                state = self.ray.get(actor.attempt.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a dead rank: ask the next
                continue
            if state is not None and slot.job is not None and state.job == slot.job.id:
                return state
        return None

    def _assign(self, slot: EngineSlot, job: Job) -> None:
        slot.job, slot.started = job, time.perf_counter()
        slot.refs = [a.run.remote(job) for a in slot.actors]
        if self.on_start is not None:
            self.on_start(slot, job)

    def _collect(self, slot: EngineSlot, queue: JobQueue, ledger: Ledger) -> None:
        ready, _ = self.ray.wait(slot.refs, num_returns=len(slot.refs), timeout=0)
        error = None
        try:
            self.ray.get(ready)
        except Exception as err:  # noqa: BLE001 - a job error or a dead actor: both end the attempt
            error = err
        if error is None and len(ready) < len(slot.refs):
            return  # still running
        job, seconds = slot.job, time.perf_counter() - slot.started
        if queue.dropped(job.id) and (error is None or self._all_preempted(slot)):
            # Withdrawn (a service's delete): nothing is recorded, and an engine whose every rank
            # stopped at the same step is whole, so it takes the next job.
            slot.job, slot.refs, slot.stop_sent, slot.state = None, [], False, None
            queue.released(job)
            return
        if error is None:
            first = self.ray.get(slot.refs[0])  # rank 0's outcome
            slot.job, slot.refs, slot.failures_in_row, slot.stop_sent, slot.state = None, [], 0, False, None
            ledger.succeeded(job, seconds=seconds, steps=first.steps, step_seconds=first.step_seconds,
                             resumed_from_step=first.resumed_from_step, windows=first.windows)
            return
        message, cause, reached = _describe_error(error), _cause(error), self._reached(slot)
        withdrawn = queue.dropped(job.id)  # and a rank failed too: nothing recorded, the engine rebuilt
        if withdrawn:
            pass
        elif isinstance(cause, Preempted):  # every rank checkpointed the same step
            ledger.preempted(job, message, seconds=seconds, reached=reached)
            self.preempted.append(job.id)
            if not self.stopping:  # not the driver's stop (a rank's own signal): resume on a new engine
                queue.put_back(job)
        elif ledger.failed_attempt(job, message, seconds=seconds, retry=retryable(cause), reached=reached) \
                and not isinstance(cause, WriteFailed):
            queue.put_back(job)
        self._stop(slot)
        if withdrawn:
            queue.released(job)  # its ranks are gone: what they wrote may go
        elif isinstance(cause, WriteFailed):
            raise cause
        if not self._stopped():
            log.warning("engine %d is rebuilt after: %s", slot.index, message)
            self._bring_up(slot)

    def _all_preempted(self, slot: EngineSlot, *, wait_s: float = 30.0) -> bool:
        """Did every rank end its call with Preempted (all stopped at the same step, none died)?
        The ranks that have not answered yet are waited for (they stop at the step the first one
        did, a moment later); one that has not answered within `wait_s` counts as a failure."""
        for ref in slot.refs:
            try:
                self.ray.get(ref, timeout=wait_s)
            except Exception as err:  # noqa: BLE001 - sorted below
                if not isinstance(_cause(err), Preempted):
                    return False
        return True

    def _show(self, slots: list[EngineSlot], bars: list) -> None:
        """Read rank 0's progress of every running job (slot.state; a service reports it) and show
        it on the engines' bars."""
        for slot in slots:
            state = None
            if slot.job is not None:
                try:
                    state = self.ray.get(slot.actors[0].progress.remote(), timeout=1)
                except Exception:  # noqa: BLE001 - progress is best effort
                    state = None
            slot.state = state if state is not None and slot.job is not None and state.job == slot.job.id else None
            if self.progress:
                bars[slot.index].set_description_str(
                    engine_line(slot.index, slot.job.id if slot.job is not None else None, state))


def _cause(err: BaseException) -> BaseException:
    """The error a rank raised, out of Ray's wrapper (a dead actor stays itself: retried)."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        return getattr(err, "cause", None) or err
    return err


def _describe_error(err: BaseException) -> str:
    import ray

    if isinstance(err, ray.exceptions.RayActorError):
        return "an engine rank died (its actor exited)"
    return error_text(_cause(err))


def connect(address: str, *, ranks: int) -> None:
    """ray.init for --ray: "local" starts a one-machine cluster on loopback, with at least one CPU
    slot per rank (CPU engines on a small machine share its cores); "auto" or an address joins a
    running one (`ray start --head` on the first node, `ray start --address` on the rest)."""
    import ray

    # Each failed attempt is reported once, by the driver (the manifest, one warning line): the
    # other ranks' calls of a torn-down engine end in errors nobody reads, and Ray would print
    # each with its traceback, after the batch's last line, when the driver lets go of them.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 num_cpus=max(os.cpu_count() or 1, ranks))
    else:
        ray.init(address=address, log_to_driver=False)
