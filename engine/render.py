"""The engine: load a pipeline once, render videos, write them, summarise."""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from unison.engine.plan import Plan, plan_run
from unison.engine import load
from unison.engine.offload import offloader_for
from unison.engine.assemble import assemble
from unison.engine.caches import describe as describe_caches
from unison.engine.io import faults
from unison.engine.io.checkpoint import Checkpoints
from unison.engine.config import RunConfig, dump_yaml
from unison.engine import schedulers
from unison.engine.lora import Loras
from unison.engine.loop import LoopResult, OnPhase, denoise
from unison.engine.precision import describe_components
from unison.engine.same_settings import check_same_settings
from unison.engine.io.stop import StopRequest
from unison.engine.io.video import mp4_stream_write, mp4_write, to_uint8_frames
from unison.engine.io.writes import commit, text_write, torch_write

log = logging.getLogger("unison")


@dataclass
class RenderResult:
    config: RunConfig
    """The resolved config, as saved beside the video."""
    latents: torch.Tensor
    loop: LoopResult
    video_path: Path | None
    config_path: Path | None
    latents_path: Path | None
    seconds: dict[str, float]
    """Wall time per phase: load, encode, denoise, decode, write, total."""
    peak_memory_bytes: int
    peak_memory_kind: str
    comm_bytes_per_step: dict[str, float]
    """Bytes this rank sent per step, by collective kind (empty on one rank)."""
    comm_calls: dict[str, int] = field(default_factory=dict)
    """Collective calls this rank made in the whole render, by kind."""
    cache_lines: list[str] = field(default_factory=list)
    """The step cache's summary (empty without a cache)."""
    cache_decisions: dict[str, list[tuple]] = field(default_factory=dict)
    """Per expert: every cache decision (step, context, what, computed), in order."""
    parallel_lines: list[str] = field(default_factory=list)
    """Per-rank memory of weight sharding (block weights held on this rank, of how many) and of
    patch parallelism (weights, stale K/V buffers); empty otherwise."""
    peak_memory_per_rank: list[int] = field(default_factory=list)
    """Every rank's peak memory, in rank order (empty on one rank)."""
    components: str = ""
    """Each component's dtype and device, read from its parameters after the render."""
    window_lines: list[str] = field(default_factory=list)
    """Diffusion forcing: the windows and each one's seconds (empty otherwise)."""

    def summary(self) -> str:
        steps = [r.seconds for r in self.loop.steps]
        s = self.seconds
        median = statistics.median(steps) if steps else 0.0
        experts = sorted({r.expert for r in self.loop.steps})
        lines = [
            f"{len(steps)} steps in {sum(steps):.2f} s ({median:.3f} s/step median"
            + (f", experts {', '.join(experts)}" if len(experts) > 1 else "") + ")",
            "time      " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items()),
            f"memory    peak {self.peak_memory_bytes / 2**30:.2f} GiB ({self.peak_memory_kind})"
            + (", per rank " + ", ".join(f"{b / 2**30:.2f}" for b in self.peak_memory_per_rank) + " GiB"
               if self.peak_memory_per_rank else ""),
        ]
        if self.loop.resumed_from_step is not None:
            lines[0] += f"; resumed from the step checkpoint after step {self.loop.resumed_from_step}"
        if self.components:
            lines.append(f"components {self.components}")
        lines += self.window_lines
        lines += [f"cache     {line}" for line in self.cache_lines]
        lines += [f"parallel  {line}" for line in self.parallel_lines]
        if self.comm_bytes_per_step:
            lines.append("comm      " + ", ".join(f"{k} {v / 2**20:.3f} MiB/step"
                                                  for k, v in sorted(self.comm_bytes_per_step.items())))
        if self.video_path:
            lines.append(f"wrote     {self.video_path} and {self.config_path}")
        if self.latents_path:
            lines.append(f"latents   {self.latents_path}")
        return "\n".join(lines)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"


def config_path_for(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".yaml")


class Engine:
    """Holds one loaded pipeline and renders any number of videos with it.

    The model (family, folder, dtype, device) is fixed when the engine is built; sampling and
    output may change per render. Every video starts from a fresh scheduler state.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        started = time.perf_counter()
        if plan.world_size > 1 and dist.is_initialized():  # before anything loads
            check_same_settings(plan.config, world_size=plan.world_size)
        self.pipe = load.load_pipeline(plan)  # through the module: a test may stand in for it
        self.offloader = offloader_for(plan, self.pipe)
        load.use_attention_backend(self.pipe, plan)
        self.loras = Loras(self.pipe, plan.spec)  # before parallelism renames or drops blocks
        """The LoRAs fused into the weights, switched per render (engine/lora.py)."""
        # Sharding, the token split and compilation, in that order (engine/assemble.py); the
        # caches come with each render, the parallel VAE with each decode.
        self.assembly = assemble(self.pipe, plan.spec, parallel=plan.config.parallel, world_size=plan.world_size,
                                 compile_blocks=plan.config.model.compile == "blocks",
                                 announce=plan.world_size == 1 or dist.get_rank() == 0)
        self.renders = 0
        """Renders started (every rank counts alike: names each render's stop key)."""
        self.pending_stop = False
        """A signal came after a render's last step: the next render stops at its first boundary."""
        self._stop: StopRequest | None = None
        """The render under way's stop request (request_stop may come from another thread)."""
        self._video = ""
        self._folder_scheduler = (type(self.pipe.scheduler), self.pipe.scheduler)
        """The scheduler the folder ships (its class, taken before the fault injector may subclass
        the instance, and the instance), before any render's choice."""
        self.scheduler_choice = ("default", None)
        faults.watch(self.pipe.scheduler, rank=self.rank, job=lambda: self._video)  # tests only
        self.load_seconds = time.perf_counter() - started

    @property
    def runtime(self):
        """The parallel runtime (None on one rank)."""
        return self.assembly.runtime

    @property
    def caches(self) -> dict:
        """The current render's caches, per expert."""
        return self.assembly.caches

    @property
    def compiled(self) -> dict:
        return self.assembly.compiled

    @property
    def rank(self) -> int:
        return self.runtime.rank if self.runtime is not None else 0

    def request_stop(self) -> None:
        """What SIGTERM does, from any thread (a Ray driver's stop): the render under way stops
        at a step boundary every rank agrees on, with a checkpoint there (Preempted); between
        renders, the next one stops at its first boundary."""
        stop = self._stop
        if stop is not None:
            stop.signalled = True
        else:
            self.pending_stop = True

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes (with output.parallel_decode every rank decodes tiles; rank 0 blends)."""
        return self.runtime is None or self.runtime.rank == 0

    @classmethod
    def from_config(cls, config: RunConfig, *, world_size: int = 1) -> "Engine":
        return cls(plan_run(config, world_size=world_size))

    def render(self, config: RunConfig | None = None, *, progress: bool | None = None,
               on_step=None, on_phase: OnPhase | None = None) -> RenderResult:
        """Render one video. `config` must name the same model as the engine's (default: its own);
        `on_step(record)` is called after every denoising step, `on_phase(phase, step, steps)` as
        each phase begins (engine.loop.PHASES), for progress reports. With progress shown (rank
        0), every phase but the steps (they have their bar) is a line on stderr.

        SIGTERM or SIGUSR1 during the render (main thread; engine/io/stop.py): every rank stops at the
        same step, writes a checkpoint there and raises Preempted. One that comes after the last
        step lets this video be written; the engine's next render then stops at its first step."""
        stop = StopRequest.for_engine(world_size=self.plan.world_size, render=self.renders)
        self.renders += 1
        stop.signalled, self.pending_stop = self.pending_stop, False
        self._stop = stop
        try:
            with stop.on_signals():
                result = self._render(config, progress=progress, on_step=on_step, on_phase=on_phase, stop=stop)
        finally:
            self._stop = None
        self.pending_stop = self.pending_stop or stop.signalled  # request_stop may land in between
        return result

    def _render(self, config: RunConfig | None, *, progress: bool | None, on_step, on_phase: OnPhase | None,
                stop: StopRequest) -> RenderResult:
        plan = self.plan if config is None else plan_run(config, world_size=self.plan.world_size)
        if plan.config.model != self.plan.config.model:
            raise ValueError("this engine holds a different model; build another Engine for it")
        if plan.config.parallel != self.plan.config.parallel:
            raise ValueError("this engine was parallelized with other parallel settings; build another Engine")
        if config is not None and plan.world_size > 1 and dist.is_initialized():  # a batch job's own settings
            check_same_settings(plan.config, world_size=plan.world_size)
        cfg, device = plan.config, plan.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        show = (cfg.output.progress if progress is None else progress) and self.is_writer
        if self.runtime is not None:
            self.runtime.stats.reset()
        self.loras.use(cfg.lora)  # before the caches: a cache keeps nothing across renders anyway
        self.assembly.use_caches(cfg.cache, cfg.cache_2)
        self._use_scheduler(cfg.sampling.scheduler, cfg.sampling.flow_shift)
        steps = cfg.sampling.steps
        for cache in self.caches.values():
            cache.begin_video(steps=steps)

        self._video = Path(cfg.output.path).stem

        def phase(name: str, step: int, total: int) -> None:
            if show and name not in ("step", "window"):  # the bar shows steps; the window loop, windows
                tqdm.write(f"unison: {name}", file=sys.stderr)
            if on_phase is not None:
                on_phase(name, step, total)
            if name == "step":  # tests only, after progress has heard of the step: a no-op unless set
                faults.at_step(self._video, step - 1, rank=self.rank)

        # Every rank its own file (cache state is per shard); all ranks agree on the step to resume.
        # Any render may be stopped by SIGTERM/SIGUSR1 and then checkpoints, so each looks for one.
        everyone = self.runtime.groups.get("cfg_tokens") if self.runtime is not None else None
        checkpoints = Checkpoints.create(cfg, rank=self.rank,
                                         world_size=self.plan.world_size, group=everyone, on_stop=True)
        loop = denoise(self.pipe, plan.spec, cfg.sampling, device=device, progress=show, runtime=self.runtime,
                       guidance=self.assembly.guidance, caches=self.caches, on_step=on_step, on_phase=phase, offload=self.offloader,
                       checkpoints=checkpoints, stop=stop,
                       keep_latents=self.is_writer or not cfg.output.decode)
        seconds = {"load": self.load_seconds, "encode": loop.encode_seconds,
                   "denoise": sum(r.seconds for r in loop.steps)}
        write = self._write_windows if loop.windows is not None else self._write_whole
        latents, latents_path, video_path, config_path = write(plan, loop, phase=phase, seconds=seconds)
        seconds["total"] = time.perf_counter() - started + self.load_seconds
        peak, kind = peak_memory(device)
        peaks = []
        if self.runtime is not None:
            peaks = [None] * self.plan.world_size
            dist.all_gather_object(peaks, peak, group=everyone)
        if checkpoints is not None:  # after the all-gather: every rank knows rank 0 has written
            checkpoints.remove()
        comm = {}
        if self.runtime is not None and loop.steps:
            comm = {k: v / len(loop.steps) for k, v in self.runtime.stats.bytes_sent.items()}
        calls = dict(self.runtime.stats.calls) if self.runtime is not None else {}
        if loop.windows is None:
            decisions, window_lines = {name: list(c.decisions) for name, c in self.caches.items()}, []
        else:  # every window's decisions, in order (each window's steps count from 0)
            w = loop.windows
            decisions = {name: [d for window in per for d in window] for name, per in w.decisions.items()}
            window_lines = [f"windows   {w.count}" + (f" (resumed in window {w.resumed_window + 1})"
                                                      if w.resumed_window is not None else "")
                            + (", " + ", ".join(f"{t:.2f}" for t in w.seconds) + " s each" if w.seconds else "")]
        return RenderResult(config=cfg, latents=latents, loop=loop, video_path=video_path,
                            config_path=config_path, latents_path=latents_path, seconds=seconds,
                            peak_memory_bytes=peak, peak_memory_kind=kind, comm_bytes_per_step=comm,
                            comm_calls=calls, cache_lines=describe_caches(self.caches), cache_decisions=decisions,
                            parallel_lines=self.runtime.describe({n: getattr(self.pipe, n) for n in plan.spec.experts})
                            if self.runtime is not None else [], peak_memory_per_rank=peaks,
                            components=describe_components(
                                self.pipe, (*plan.spec.experts, *plan.spec.text_encoders, "vae")),
                            window_lines=window_lines)

    def _write_whole(self, plan: Plan, loop: LoopResult, *, phase, seconds: dict):
        """The latents saved (output.save_latents), the video decoded (collectively with parallel
        decode) and written with its config: (latents, latents_path, video_path, config_path)."""
        cfg, steps = plan.config, plan.config.sampling.steps
        latents_path = video_path = config_path = None
        if cfg.output.save_latents and self.is_writer:
            latents_path = Path(cfg.output.save_latents)
            phase("writing", len(loop.steps), steps)
            commit(torch_write(latents_path, loop.latents))  # WriteFailed (nothing at the path) on failure
        # Parallel decode is collective: every rank decodes its tiles, rank 0 gets the frames.
        parallel_decode = self.runtime is not None and cfg.output.parallel_decode
        if cfg.output.decode and (self.is_writer or parallel_decode):
            phase("decoding", len(loop.steps), steps)
            t0 = time.perf_counter()
            latents, drop = loop.decode if loop.decode is not None else (loop.latents, 0)
            frames = self.decode(latents, output=cfg.output, drop=drop)
            seconds["decode"] = time.perf_counter() - t0
        if cfg.output.decode and self.is_writer:
            phase("writing", len(loop.steps), steps)
            t0 = time.perf_counter()
            video_path = Path(cfg.output.path)
            config_path = config_path_for(video_path)
            # Both read back before either is renamed, the video last: a video on disk is finished and
            # has its config beside it. On failure WriteFailed, and neither file is there.
            commit(text_write(config_path, dump_yaml(cfg)), mp4_write(video_path, frames, fps=cfg.output.fps))
            seconds["write"] = time.perf_counter() - t0
        return loop.latents, latents_path, video_path, config_path

    def _write_windows(self, plan: Plan, loop: LoopResult, *, phase, seconds: dict):
        """_write_whole for a diffusion-forcing render: the windows' latents are read back one window
        at a time (engine/windows.WindowStore) and decoded as a stream into the mp4 encoder, the
        causal VAE's cache carried across windows, so neither the latents nor the frames are ever
        held whole (output.save_latents, or decode off, asks for the latents whole: they are then
        the result's `latents`, else the last window's). Rank 0 decodes."""
        cfg, device = plan.config, plan.device
        steps, store = len(loop.steps), loop.windows.store
        latents, latents_path = loop.latents, None
        if store.keep and (cfg.output.save_latents or not cfg.output.decode):
            latents = store.latents(device)
        if cfg.output.save_latents and self.is_writer:
            latents_path = Path(cfg.output.save_latents)
            phase("writing", steps, steps)
            commit(torch_write(latents_path, latents))
        video_path = config_path = None
        if cfg.output.decode and self.is_writer:
            phase("decoding", steps, steps)
            t0 = time.perf_counter()
            video_path, config_path = Path(cfg.output.path), config_path_for(cfg.output.path)
            s = cfg.sampling
            count, frames = plan.spec.hooks.written_frames(self.pipe, s, store.pieces(device))

            def chunks():
                with torch.no_grad():
                    yield from frames

            commit(text_write(config_path, dump_yaml(cfg)),
                   mp4_stream_write(video_path, chunks, frames=count, height=s.height, width=s.width,
                                    fps=cfg.output.fps))
            seconds["decode+write"] = time.perf_counter() - t0
        return latents, latents_path, video_path, config_path

    def _use_scheduler(self, name: str, flow_shift: float | None) -> None:
        """The render's sampler (engine/schedulers.py), built from the folder's scheduler."""
        if (name, flow_shift) == self.scheduler_choice:
            return
        cls, shipped = self._folder_scheduler
        if (name, flow_shift) == ("default", None):
            self.pipe.scheduler = shipped
        else:
            self.pipe.scheduler = schedulers.build(cls, shipped.config, name, flow_shift)
            faults.watch(self.pipe.scheduler, rank=self.rank, job=lambda: self._video)  # tests only
        self.scheduler_choice = (name, flow_shift)

    def decode(self, latents: torch.Tensor, *, output=None, drop: int = 0):
        """Latents -> uint8 frames (F, H, W, 3) of the first video in the batch, less the first
        `drop` frames (ModelSpec.decode_input).

        `output` (default: the engine's) says how. With more than one rank and
        `output.parallel_decode`, this is collective: every rank must call it, each decodes its
        share of the VAE's tiles, and rank 0 gets the frames (the others None)."""
        pipe, output = self.pipe, output or self.plan.config.output
        with torch.no_grad():
            video = self.plan.spec.hooks.decode(self.assembly.vae(output), latents)
        if video is None:  # parallel decode: a rank other than 0
            return None
        frames = pipe.video_processor.postprocess_video(video[:, :, drop:], output_type="np")[0]
        return to_uint8_frames(frames)
