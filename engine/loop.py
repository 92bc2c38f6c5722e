"""The denoising loop, owned by the engine and built from the pipeline's own components.

Structure differs from diffusers' `__call__` (so that CFG parallelism, per-branch cache
contexts and per-step hooks can be added); numbers do not: the same calls in the same
order, so on one device with no cache the final latents equal diffusers' output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from unison.engine.io.checkpoint import Checkpoints
from unison.engine.config import SamplingConfig
from unison.engine.models import Conditioning, ModelSpec
from unison.engine.offload import Offloader
from unison.engine.io.stop import StopRequest
from unison.engine.errors import NonFiniteLatents, Preempted
from unison.parallel.cfg import Guidance


PHASES = ("encoding", "step", "checkpointing", "decoding", "writing")
"""What a render is doing, in order, as `on_phase(phase, step, steps)` hears it when each begins:
"step" once per denoising step (`step` is the one starting, 1 to `steps`); for the others
`step` counts the steps finished. "checkpointing" is saving a step checkpoint. A worker adds
"loading" (building its engine) and "idle". A diffusion-forcing render (engine/windows.py) also
says "window" as each window begins, (window, windows) in place of (step, steps), and counts its
steps (forwards) over the whole video."""
OnPhase = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StepRecord:
    index: int
    timestep: float
    expert: str
    seconds: float


@dataclass
class LoopResult:
    latents: torch.Tensor
    """Final latents before VAE decode, shaped like diffusers' output_type="latent" result."""
    steps: list[StepRecord] = field(default_factory=list)
    encode_seconds: float = 0.0
    resumed_from_step: int | None = None
    """The first step this render ran, when it continued from a step checkpoint (else None);
    `steps` then holds only the steps from there on."""
    decode: tuple[torch.Tensor, int] | None = None
    """What the video decodes from when it is not `latents` (ModelSpec.decode_input): the latents
    and the leading pixel frames to drop."""
    windows: object = None
    """Diffusion forcing (engine/windows.WindowRecord): the finished windows' latents, times and
    cache decisions; `latents` is then only the last window's."""


def initial_latents(pipe, spec: ModelSpec, sampling: SamplingConfig, device: torch.device,
                    conditioning: Conditioning) -> torch.Tensor:
    """Initial noise from a CPU generator seeded with sampling.seed: the same tensor on every
    device and every rank, so ranks never need to broadcast it (then the family's
    prepare_latents, if any)."""
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    noise = spec.hooks.initial_latents(pipe, sampling, device, generator, denoiser=getattr(pipe, spec.experts[0]))
    return spec.hooks.prepare_latents(pipe, noise, conditioning)


class StepTimer:
    """Per-step times without stalling the GPU.

    On the CPU a step's time is its wall time. On a CUDA device each step records an event pair
    on the compute stream and the times are read once, after the loop: a per-step
    `torch.cuda.synchronize` would also wait for the communication streams, so an asynchronous
    exchange started in one step (displaced patches' all-gather, waited on a step later) could
    then overlap only the rest of its own step. Events on the compute stream wait for nothing
    but the compute. `wall()` is the host's view, for progress only: the host may run ahead of
    the GPU by a step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple] = []
        self._mark = time.perf_counter()

    def start(self):
        self._mark = time.perf_counter()
        if not self.cuda:
            return self._mark
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((started, end))
        else:
            self.events.append((started, time.perf_counter()))

    def wall(self) -> float:
        return time.perf_counter() - self._mark

    def seconds(self) -> list[float]:
        """Every step's seconds (on CUDA, waits for the last step's compute, nothing else)."""
        if not self.cuda:
            return [end - start for start, end in self.events]
        if self.events:
            self.events[-1][1].synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in self.events]


class FiniteCheck:
    """Stops a video whose latents stop being finite, naming the first bad step and its expert,
    before anything decodes or writes them.

    On the CPU each step is checked as it ends (reading a flag there costs nothing), so the video
    stops at once. On a GPU a per-step read would make the host wait for every step's kernels, the
    stall StepTimer avoids: each step only queues `isfinite(latents).all()` (one flag on the
    device, one pass over the latents) and the flags are read together once, after the loop. A bad
    video then costs its remaining steps, never a written file. Every rank holds the same latents,
    so every rank stops at the same step and no collective is left waiting."""

    def __init__(self, device: torch.device, steps: int):
        self.now = device.type == "cpu"
        self.steps = steps
        self.flags: list[torch.Tensor] = []
        self.experts: list[str] = []
        self.read = 0
        """Steps whose flags were already read."""

    def after_step(self, index: int, latents: torch.Tensor, expert: str) -> None:
        finite = torch.isfinite(latents).all()
        if self.now:
            if not finite:
                raise NonFiniteLatents(index, self.steps, expert)
            return
        self.flags.append(finite)
        self.experts.append(expert)

    def finish(self) -> None:
        """Read the flags queued since the last read (one host read per video, and one before each
        step checkpoint, which reads the latents to the host anyway); raise for the first bad step."""
        if not self.flags:
            return
        finite, first_index = torch.stack(self.flags).tolist(), self.read
        self.read += len(self.flags)
        self.flags = []
        if not all(finite):
            first = finite.index(False)
            raise NonFiniteLatents(first_index + first, self.steps, self.experts[first_index + first])


class Step:
    """The step under way, as the step hooks hear of it."""

    __slots__ = ("index", "total", "timestep", "expert", "window")

    def __init__(self, index: int, total: int, timestep: float, expert: str, window=None):
        self.index, self.total, self.timestep, self.expert = index, total, timestep, expert
        self.window = window
        """Diffusion forcing: where in its windows the step is (engine/windows.WindowStep); else None."""


class StepHook:
    """What the loop tells about each step, in the order of its hooks list: `before` as a step
    starts, `after` with the step's latents, `end` after the last step. Defaults do nothing."""

    def before(self, step: Step) -> None:
        pass

    def after(self, step: Step, latents: torch.Tensor) -> None:
        pass

    def end(self) -> None:
        pass


class Phases(StepHook):
    """on_phase("step", ...) as each step begins (a host-side call: no sync)."""

    def __init__(self, on_phase: OnPhase):
        self.on_phase = on_phase

    def before(self, step: Step) -> None:
        self.on_phase("step", step.index + 1, step.total)


class Timing(StepHook):
    """Per-step records: the host's time for progress as each step ends, the device's at the end."""

    def __init__(self, device: torch.device):
        self.timer, self.records, self._started = StepTimer(device), [], None

    def before(self, step: Step) -> None:
        self._started = self.timer.start()

    def after(self, step: Step, latents: torch.Tensor) -> None:
        self.timer.stop(self._started)
        self.records.append(StepRecord(index=step.index, timestep=step.timestep, expert=step.expert,
                                       seconds=self.timer.wall()))

    def end(self) -> None:
        self.records = [dataclasses.replace(r, seconds=s) for r, s in zip(self.records, self.timer.seconds())]


class Offloading(StepHook):
    """model.offload: only the step's expert on the device."""

    def __init__(self, offload: Offloader):
        self.offload = offload

    def before(self, step: Step) -> None:
        self.offload.use_expert(step.expert)


class Finite(StepHook):
    """FiniteCheck as a hook: every step's latents checked (read at once on the CPU, at the end on a GPU)."""

    def __init__(self, check: FiniteCheck):
        self.check = check

    def after(self, step: Step, latents: torch.Tensor) -> None:
        self.check.after_step(step.index, latents, step.expert)

    def end(self) -> None:
        self.check.finish()


class Bar(StepHook):
    """The progress bar (rank 0), advanced past the steps a resumed render skips."""

    def __init__(self, bar, done: int):
        self.bar = bar
        if done:
            bar.update(done)

    def after(self, step: Step, latents: torch.Tensor) -> None:
        self.bar.update(1)


class Checkpointing(StepHook):
    """A step checkpoint every N steps (output.checkpoint_every), and at a boundary every rank's
    stop request agrees on: written there, then Preempted. `extra()`: more loop state to save
    beside the latents (engine/windows.py: the window, each frame's scheduler, the generators);
    `pipe` None: no pipeline scheduler state (that loop keeps its own)."""

    def __init__(self, checkpoints: Checkpoints | None, stop: StopRequest | None, *, pipe, caches: dict,
                 finite: FiniteCheck, on_phase: OnPhase | None, extra: Callable[[], dict] | None = None):
        self.checkpoints, self.stop, self.pipe, self.caches = checkpoints, stop, pipe, caches
        self.finite, self.on_phase, self.extra = finite, on_phase, extra

    def after(self, step: Step, latents: torch.Tensor) -> None:
        i, total = step.index, step.total
        preempted = self.stop is not None and i + 1 < total and self.stop.should_stop(i + 1)
        if preempted or (self.checkpoints is not None and self.checkpoints.due(i, total)):
            self.finite.finish()  # never a checkpoint of latents gone non-finite (a GPU's queued flags)
            if self.on_phase is not None:
                self.on_phase("checkpointing", i + 1, total)
            self.checkpoints.save(i, latents, self.pipe.scheduler if self.pipe is not None else None, self.caches,
                                  extra=self.extra() if self.extra is not None else None)
            if preempted:
                self.checkpoints.wait_for_all()  # no rank leaves (and is reaped) before every checkpoint is in
                raise Preempted(i + 1, total, str(self.checkpoints.folder))


class Reports(StepHook):
    """on_step(record) once the step is over (its checkpoint included)."""

    def __init__(self, on_step: Callable[[StepRecord], None], timing: Timing):
        self.on_step, self.timing = on_step, timing

    def after(self, step: Step, latents: torch.Tensor) -> None:
        self.on_step(self.timing.records[-1])


def select_experts(boundary: float | None, timesteps: torch.Tensor) -> list[int]:
    """Index into spec.experts for every step: experts[0] for timesteps at or above the boundary
    (high noise). Compared as tensors, as diffusers compares them (in the timesteps' dtype), and
    read to the host once for the whole video."""
    if boundary is None:
        return [0] * len(timesteps)
    return [0 if high else 1 for high in (timesteps >= boundary).tolist()]


def denoise_step(pipe, spec: ModelSpec, conditioning: Conditioning, latents: torch.Tensor, t: torch.Tensor,
                 step: Step, *, model, scale: float, guidance: Guidance, watchers: list) -> torch.Tensor:
    """One step: the model on each guidance branch this rank runs, guided, the scheduler stepped.
    `watchers` (the expert's cache, the parallel runtime) hear the step and each branch first."""
    x = spec.hooks.model_input(pipe, latents, conditioning).to(model.dtype)
    timestep = spec.hooks.timestep_input(pipe, t, latents, conditioning)
    for watcher in watchers:
        watcher.begin_step(step.index, step.timestep)

    def predict(context: str) -> torch.Tensor:
        for watcher in watchers:
            watcher.set_context(context)
        branch = conditioning.cond if context == "cond" else conditioning.uncond
        return model(hidden_states=x, timestep=timestep, return_dict=False, **branch)[0]

    noise = guidance.noise(predict, two_branches=conditioning.uncond is not None, scale=scale)
    return spec.hooks.scheduler_step(pipe, noise, t, latents, conditioning)


def denoise(
    pipe,
    spec: ModelSpec,
    sampling: SamplingConfig,
    *,
    device: torch.device,
    progress: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: OnPhase | None = None,
    runtime=None,
    guidance: Guidance | None = None,
    caches: dict | None = None,
    offload: Offloader | None = None,
    checkpoints: Checkpoints | None = None,
    stop: StopRequest | None = None,
    keep_latents: bool = True,
) -> LoopResult:
    """Run the denoising loop. `guidance` (parallel/cfg.py) says whether this rank computes one
    guidance branch (CFG parallel) or both. `caches` (per expert name) and `runtime` (the parallel
    state) are told the step and the branch (cache context) before every forward. `offload`
    (model.offload) brings the text encoders in to encode and keeps only the running expert on
    the device. `checkpoints` (output.checkpoint_every) resumes from the latest step checkpoint
    of the same run, if any, and writes one every N steps (engine/io/checkpoint.py). `stop`
    (engine/io/stop.py) is asked at every step boundary; when it says stop, a checkpoint is
    written there (needs `checkpoints`, whatever its N) and Preempted is raised.
    `on_phase` hears "encoding" and every "step" as it begins (see PHASES). A diffusion-forcing
    family (spec.forcing) renders window by window in engine/windows.py."""
    if spec.forcing:
        from unison.engine.windows import denoise_windows

        return denoise_windows(pipe, spec, sampling, device=device, progress=progress, on_step=on_step,
                               on_phase=on_phase, runtime=runtime, guidance=guidance, caches=caches,
                               offload=offload, checkpoints=checkpoints, stop=stop, keep_latents=keep_latents)
    caches, guidance = caches or {}, guidance or Guidance()
    for watcher in [*caches.values(), *([runtime] if runtime is not None else [])]:
        watcher.reset()
    started = time.perf_counter()
    if on_phase is not None:
        on_phase("encoding", 0, sampling.steps)
    with torch.no_grad(), offload.encoding() if offload is not None else contextlib.nullcontext():
        conditioning: Conditioning = spec.hooks.encode(pipe, sampling, device)
    encode_seconds = time.perf_counter() - started
    timesteps = spec.hooks.set_timesteps(pipe, sampling.steps, device, sampling.sigmas)
    experts = [getattr(pipe, name) for name in spec.experts]
    latents, start = initial_latents(pipe, spec, sampling, device, conditioning), 0
    if checkpoints is not None:  # after set_timesteps and the caches' reset: the saved state replaces theirs
        resumed = checkpoints.restore(pipe.scheduler, caches, device)
        if resumed is not None:
            start, latents = resumed.step, resumed.latents
    guidance.check(two_branches=conditioning.uncond is not None)
    total, finite, timing = len(timesteps), FiniteCheck(device, len(timesteps)), Timing(device)
    bar = tqdm(total=total, desc="denoise", unit="step", disable=not progress, leave=False)
    # In this order: a step's progress phase is heard before its time starts, its latents are
    # checked before its time ends, its checkpoint is written before on_step hears of it.
    hooks: list[StepHook] = [*([Phases(on_phase)] if on_phase is not None else []), Finite(finite), timing,
                             *([Offloading(offload)] if offload is not None else []), Bar(bar, start),
                             Checkpointing(checkpoints, stop, pipe=pipe, caches=caches, finite=finite, on_phase=on_phase),
                             *([Reports(on_step, timing)] if on_step is not None else [])]
    with torch.no_grad(), bar:
        # The timesteps read to the host once per video (the expert switch, caches and records
        # need them there), not once per step.
        schedule = zip(timesteps, timesteps.tolist(), select_experts(spec.hooks.expert_boundary(pipe), timesteps))
        for i, (t, host_t, which) in enumerate(schedule):
            if i < start:  # done before the checkpoint this render resumed from
                continue
            step = Step(i, total, host_t, spec.experts[which])
            for hook in hooks:
                hook.before(step)
            watchers = [w for w in (caches.get(step.expert), runtime) if w is not None]
            latents = denoise_step(pipe, spec, conditioning, latents, t, step, model=experts[which],
                                   scale=conditioning.scales[which], guidance=guidance, watchers=watchers)
            for hook in hooks:
                hook.after(step, latents)
    for hook in hooks:
        hook.end()
    decode = spec.hooks.decode_input(pipe, latents, conditioning)
    latents = spec.hooks.finish(pipe, latents, conditioning)
    return LoopResult(latents=latents, steps=timing.records, encode_seconds=encode_seconds,
                      resumed_from_step=start if start else None, decode=decode)
