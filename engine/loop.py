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
from unison.parallel.comm import all_gather


PHASES = ("encoding", "step", "checkpointing", "decoding", "writing")
"""What a render is doing, in order, as `on_phase(phase, step, steps)` hears it when each begins:
"step" once per denoising step (`step` is the one starting, 1 to `steps`); for the others
`step` counts the steps finished. "checkpointing" is saving a step checkpoint. A worker adds
"loading" (building its engine) and "idle"."""
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


def select_experts(boundary: float | None, timesteps: torch.Tensor) -> list[int]:
    """Index into spec.experts for every step: experts[0] for timesteps at or above the boundary
    (high noise). Compared as tensors, as diffusers compares them (in the timesteps' dtype), and
    read to the host once for the whole video."""
    if boundary is None:
        return [0] * len(timesteps)
    return [0 if high else 1 for high in (timesteps >= boundary).tolist()]


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
    caches: dict | None = None,
    offload: Offloader | None = None,
    checkpoints: Checkpoints | None = None,
    stop: StopRequest | None = None,
) -> LoopResult:
    """Run the denoising loop. With a `runtime` whose cfg axis is 2, this rank computes one
    guidance branch (cfg index 0: cond, 1: uncond) and the two predictions are exchanged once per
    step; every rank then combines and steps the scheduler identically. `caches` (per expert
    name) are told the step and the branch (cache context) before every forward. `offload`
    (model.offload) brings the text encoders in to encode and keeps only the running expert on
    the device. `checkpoints` (output.checkpoint_every) resumes from the latest step checkpoint
    of the same run, if any, and writes one every N steps (engine/checkpoint.py). `stop`
    (engine/stop.py) is asked at every step boundary; when it says stop, a checkpoint is written
    there (needs `checkpoints`, whatever its N) and Preempted is raised.
    `on_phase` hears "encoding" and every "step" as it begins (see PHASES)."""
    caches = caches or {}
    for cache in caches.values():
        cache.reset()
    if runtime is not None:
        runtime.begin_video()
    started = time.perf_counter()
    if on_phase is not None:
        on_phase("encoding", 0, sampling.steps)
    with torch.no_grad(), offload.encoding() if offload is not None else contextlib.nullcontext():
        conditioning: Conditioning = spec.hooks.encode(pipe, sampling, device)
    encode_seconds = time.perf_counter() - started
    timesteps = spec.hooks.set_timesteps(pipe, sampling.steps, device)
    experts = [getattr(pipe, name) for name in spec.experts]
    boundary = spec.hooks.expert_boundary(pipe)
    latents = initial_latents(pipe, spec, sampling, device, conditioning)
    start = 0
    if checkpoints is not None:  # after set_timesteps and the caches' reset: the saved state replaces theirs
        resumed = checkpoints.restore(pipe.scheduler, caches, device)
        if resumed is not None:
            start, latents = resumed.step, resumed.latents
    records: list[StepRecord] = []
    cfg_group = runtime.groups.get("cfg") if runtime is not None else None
    cfg_index = runtime.groups.index("cfg") if runtime is not None else 0
    if cfg_group is not None and conditioning.uncond is None:
        raise ValueError("CFG parallel needs two guidance branches, but this run has one")
    bar = tqdm(total=len(timesteps), desc="denoise", unit="step", disable=not progress, leave=False)
    timer = StepTimer(device)
    finite = FiniteCheck(device, len(timesteps))
    with torch.no_grad(), bar:
        # The timesteps read to the host once per video (the expert switch, caches and records
        # need them there), not once per step.
        schedule = zip(timesteps, timesteps.tolist(), select_experts(boundary, timesteps))
        for i, (t, host_t, which) in enumerate(schedule):
            if i < start:  # done before the checkpoint this render resumed from
                bar.update(1)
                continue
            if on_phase is not None:  # a host-side call: no sync
                on_phase("step", i + 1, len(timesteps))
            step_start = timer.start()
            if offload is not None:
                offload.use_expert(spec.experts[which])
            model, scale = experts[which], conditioning.scales[which]
            cache = caches.get(spec.experts[which])
            x = spec.hooks.model_input(pipe, latents, conditioning).to(model.dtype)
            timestep = spec.hooks.timestep_input(pipe, t, latents, conditioning)

            def predict(context: str, branch: dict) -> torch.Tensor:
                if cache is not None:
                    cache.set_context(context)
                if runtime is not None:
                    runtime.set_branch(context)
                return model(hidden_states=x, timestep=timestep, return_dict=False, **branch)[0]

            if cache is not None:
                cache.begin_step(i, host_t)
            if runtime is not None:
                runtime.begin_step(i)
            if cfg_group is not None:
                mine = predict("cond", conditioning.cond) if cfg_index == 0 else predict("uncond", conditioning.uncond)
                both = all_gather(mine.unsqueeze(0), dim=0, group=cfg_group, stats=runtime.stats)
                noise = both[1] + scale * (both[0] - both[1])
            else:
                noise = predict("cond", conditioning.cond)
            if cfg_group is None and conditioning.uncond is not None:
                noise_uncond = predict("uncond", conditioning.uncond)
                noise = noise_uncond + scale * (noise - noise_uncond)
            latents = spec.hooks.scheduler_step(pipe, noise, t, latents, conditioning)
            finite.after_step(i, latents, spec.experts[which])
            timer.stop(step_start)
            # Progress sees the host's time; the records get the device's (below).
            record = StepRecord(index=i, timestep=host_t, expert=spec.experts[which], seconds=timer.wall())
            records.append(record)
            bar.update(1)
            preempted = stop is not None and i + 1 < len(timesteps) and stop.should_stop(i + 1)
            if preempted or (checkpoints is not None and checkpoints.due(i, len(timesteps))):
                finite.finish()  # never a checkpoint of latents gone non-finite (a GPU's queued flags)
                if on_phase is not None:
                    on_phase("checkpointing", i + 1, len(timesteps))
                checkpoints.save(i, latents, pipe.scheduler, caches)
                if preempted:
                    checkpoints.wait_for_all()  # no rank leaves (and is reaped) before every checkpoint is in
                    raise Preempted(i + 1, len(timesteps), str(checkpoints.folder))
            if on_step is not None:
                on_step(record)
    finite.finish()
    decode = spec.hooks.decode_input(pipe, latents, conditioning)
    latents = spec.hooks.finish(pipe, latents, conditioning)
    records = [dataclasses.replace(r, seconds=s) for r, s in zip(records, timer.seconds())]
    return LoopResult(latents=latents, steps=records, encode_seconds=encode_seconds,
                      resumed_from_step=start if start else None, decode=decode)
