"""The worker: one engine (all its ranks) that loads the model once and renders jobs.

Every launcher drives the same worker: a single process, torchrun (all ranks are one engine and
run the jobs in the same order), and Ray (one actor per rank, jobs handed out by the driver).
Rendering is collective, so every rank of an engine runs the same job at the same time; rank 0
writes the files.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from unison.engine.plan import Plan, plan_run
from unison.engine.config import RunConfig
from unison.engine.render import Engine


@dataclass(frozen=True)
class Job:
    id: str
    line: int
    """1-based line number in the jobs file."""
    config: RunConfig
    """The whole resolved config for this job; output.path is DIR/<id>.mp4."""


@dataclass(frozen=True)
class Outcome:
    id: str
    seconds: float
    steps: int
    step_seconds: float
    """Median seconds per denoising step."""
    video: str | None
    """The video this rank wrote (rank 0), else None."""
    resumed_from_step: int = 0
    """The step this attempt started from (0, or the step checkpoint's)."""
    summary: str = ""
    """The render's summary (time, memory, cache, parallel, what was written), as rank 0 prints it."""
    windows: int = 0
    """Diffusion forcing: the video's windows (0 otherwise)."""


@dataclass(frozen=True)
class Progress:
    job: str | None
    step: int
    steps: int
    phase: str = "idle"
    """"loading" while the worker builds its engine, "idle" between jobs, and during a job the
    render's phase (engine.loop.PHASES: encoding, step, checkpointing, decoding, writing), or
    "starting" before the first."""
    first: int = 0
    """The step the render started from: 0, or a step checkpoint's (known from its first step)."""
    window: tuple[int, int] | None = None
    """Diffusion forcing: (the window under way, 1-based, the video's windows); steps then count
    forwards over the whole video."""

    @property
    def finished(self) -> int:
        """Steps finished so far: during step k, k - 1; a checkpoint after step k, k."""
        if self.phase == "step":
            return self.step - 1
        if self.phase == "checkpointing":
            return self.step
        if self.phase in ("decoding", "writing"):
            return self.steps
        return self.first

    def describe(self) -> str:
        """The line a driver prints: "job cat, decoding", "job dog, step 12/50", "loading"."""
        now = f"step {self.step}/{self.steps}" if self.phase == "step" else self.phase
        if self.window is not None and self.phase in ("step", "checkpointing"):
            now = f"window {self.window[0]}/{self.window[1]}, {now}"
        return now if self.job is None else f"job {self.job}, {now}"


class Worker:
    """Holds one Engine; `run(job)` renders it. `progress()` may be read from another thread.
    `on_progress` is told the worker is "loading" before its engine builds."""

    def __init__(self, plan: Plan, *, on_progress: Callable[[Progress], None] | None = None):
        self._lock = threading.Lock()
        self._progress = Progress(job=None, step=0, steps=0, phase="loading")
        if on_progress is not None:
            on_progress(self._progress)
        self.engine = Engine(plan)
        self._set(Progress(job=None, step=0, steps=0))
        self._attempt: Progress | None = None
        self._cancelled: str | None = None

    @classmethod
    def from_config(cls, config: RunConfig, *, world_size: int = 1) -> "Worker":
        return cls(plan_run(config, world_size=world_size))

    def progress(self) -> Progress:
        with self._lock:
            return self._progress

    def attempt(self) -> Progress | None:
        """The last job's progress as it stopped (kept after the job ends, unlike progress()):
        where a failed or preempted attempt started and how far it got."""
        with self._lock:
            return self._attempt

    def request_stop(self) -> None:
        """Stop the job under way at a step boundary with a checkpoint (Engine.request_stop)."""
        self.engine.request_stop()

    def cancel(self, job_id: str) -> bool:
        """Stop `job_id` if it is the job under way, as request_stop does (every rank stops at the
        same step; Preempted), without touching the jobs after it: a stop that lands after its
        last step is dropped when the job ends. False when `job_id` is not under way."""
        with self._lock:
            if self._progress.job != job_id:
                return False
            self._cancelled = job_id
        self.engine.request_stop()
        return True

    def _set(self, progress: Progress) -> None:
        with self._lock:
            self._progress = progress
            if progress.job is not None:
                self._attempt = progress

    def run(self, job: Job, *, on_progress: Callable[[Progress], None] | None = None,
            progress: bool | None = False) -> Outcome:
        """Render `job`; `on_progress` is also told every phase and step (the local driver's bar);
        `progress`: the render's own bar and phase lines (rank 0; None: as output.progress says,
        `unison generate`). A job of the engine's own config renders the engine's plan as it is."""
        started = time.perf_counter()

        first, window = None, None

        def phase(name: str, step: int, steps: int) -> None:
            nonlocal first, window
            if name == "window":  # diffusion forcing: the window now under way (its steps follow)
                window = (step, steps)
                return
            if name == "step" and first is None:
                first = step - 1
            self._set(Progress(job.id, step, steps, phase=name, first=first or 0, window=window))
            if on_progress is not None:
                on_progress(self.progress())

        self._set(Progress(job=job.id, step=0, steps=job.config.sampling.steps, phase="starting"))
        try:
            own = job.config == self.engine.plan.config  # planned and checked across ranks already
            result = self.engine.render(None if own else job.config, progress=progress, on_phase=phase)
        finally:
            self._set(Progress(job=None, step=0, steps=0))
            with self._lock:
                if self._cancelled == job.id:  # the cancel's stop is this job's alone
                    self._cancelled = None
                    self.engine.pending_stop = False
        times = [r.seconds for r in result.loop.steps]
        return Outcome(id=job.id, seconds=time.perf_counter() - started, steps=len(times),
                       step_seconds=statistics.median(times) if times else 0.0,
                       video=str(result.video_path) if result.video_path else None,
                       resumed_from_step=result.loop.resumed_from_step or 0, summary=result.summary(),
                       windows=result.loop.windows.count if result.loop.windows is not None else 0)
