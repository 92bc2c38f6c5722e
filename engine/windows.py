"""Diffusion forcing: a video rendered window by window, each frame at its own noise level.

A diffusion-forcing model (SkyReels-V2 DF) denoises every latent frame on its own schedule. The
loop here is diffusers' SkyReelsV2DiffusionForcing*Pipeline's in numbers (the same calls in the
same order, so one rank with no cache gives its latents) and the engine's in structure (guidance
branches, caches and the parallel runtime hear every forward as in engine/loop.py):

- The video is cut into windows of `window_frames` (diffusers' base_num_frames); each window after
  the first starts from the last `overlap_frames` (overlap_history) of the one before, given as
  finished frames ("prefix", cut to a multiple of the causal block), and adds the rest.
- The first window may be given frames too: an image-to-video picture's latent frame, or an
  extended video's last frames (`Windows.extend`); the last window may end with a last frame's,
  never stepped (the family's `end_frames`).
- Inside a window, the family's step matrix (SkyReels-V2: diffusers' `generate_timestep_matrix`)
  gives one row of per-frame timesteps per forward: synchronous (ar_step 0: every frame on the
  same schedule) or asynchronous (each block of `causal_block_size` frames ar_step steps behind
  the one before, under a block-causal mask). Each frame has its own copy of the scheduler and is
  stepped only where the row's mask says so.
- `addnoise_condition` > 0 gives the prefix frames a little fresh noise at every forward and that
  timestep; the noise comes from a CPU generator seeded with sampling.seed (diffusers draws it
  from torch's global generator: seeded alike, the same numbers), so every rank draws the same.

A "step" for progress, caches and checkpoints is one row (one forward per guidance branch):
`Step.index` counts rows over the whole video, the caches count them per window (a window is a new
video to them: its frames, its length and its prefix differ from the last window's).

Finished windows' latents go to disk as each window ends (`WindowStore`), so memory does not grow
with the video and a resumed render never recomputes a window; engine/render.py decodes them
window by window into the encoder.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from unison.engine.errors import UserError

@dataclass(frozen=True)
class Windows:
    """Where each window of a video lies, in latent frames (diffusers' long-video arithmetic)."""

    latent_frames: int
    """The whole video's."""
    base: int
    """A full window's."""
    overlap: int
    """Frames each window after the first repeats from the one before (0: one window)."""
    block: int
    """The causal block: a prefix is cut to a multiple of it."""
    extend: bool = False
    """The first window continues a given video (sampling.extend) from its last `overlap` frames."""

    @classmethod
    def of(cls, sampling, *, temporal: int, block: int) -> "Windows":
        latent = (sampling.frames - 1) // temporal + 1
        extend = getattr(sampling, "extend", None) is not None
        long = extend or (sampling.overlap_frames is not None and sampling.frames > sampling.window_frames)
        if not long:
            return cls(latent_frames=latent, base=latent, overlap=0, block=block)
        return cls(latent_frames=latent, base=(sampling.window_frames - 1) // temporal + 1,
                   overlap=(sampling.overlap_frames - 1) // temporal + 1, block=block, extend=extend)

    @property
    def long(self) -> bool:
        return self.overlap > 0

    @property
    def count(self) -> int:
        if not self.long:
            return 1
        return 1 + (self.latent_frames - self.base - 1) // (self.base - self.overlap) + 1

    def size(self, k: int) -> int:
        """Latent frames window `k` denoises (its prefix included)."""
        if k == 0 and not self.extend:
            return self.base
        finished = k * (self.base - self.overlap) + self.overlap
        return min(self.latent_frames - finished + self.overlap, self.base)

    def prefix(self, k: int) -> int:
        """Finished frames window `k` starts from (the overlap, cut to whole causal blocks)."""
        return 0 if k == 0 and not self.extend else self.overlap - self.overlap % self.block

    def new(self, k: int) -> int:
        """Frames window `k` adds to the video."""
        return self.size(k) if k == 0 and not self.extend else self.size(k) - self.overlap


def rows(sampling, hooks, *, temporal: int) -> list[int]:
    """Forwards (rows) per window, without a model: the steps a cache or a checkpoint counts.
    `hooks`: the family's (its step matrix, and what the first window is given)."""
    block = sampling.causal_block_size
    windows = Windows.of(sampling, temporal=temporal, block=block)
    template = torch.arange(sampling.steps, 0, -1) * (1000 // max(sampling.steps, 1))
    counts = []
    for k in range(windows.count):
        end = hooks.end_count(sampling) if k == windows.count - 1 else 0
        size = windows.size(k)
        base = size if hooks.base_is_window(sampling) else windows.base
        ready = windows.prefix(k) if k or windows.extend else hooks.given_frames(sampling)  # as the loop's
        matrix, _, _ = hooks.step_matrix(size + end, template, base=base + end, ar_step=sampling.ar_step,
                                         ready=ready, block=block)
        counts.append(len(matrix))
    return counts


def check(sampling, *, temporal: int, block: int, title: str) -> None:
    """The window settings diffusers would refuse or mis-render, as one-line UserErrors (before loading)."""
    if sampling.ar_step < 0:
        raise UserError(f"sampling.ar_step must be at least 0 (0: synchronous), got {sampling.ar_step}")
    if block < 1:
        raise UserError(f"sampling.causal_block_size must be at least 1, got {block}")
    if not 0 <= sampling.addnoise_condition <= 1000:
        raise UserError(f"sampling.addnoise_condition must be between 0 and 1000 (a timestep; 20 is "
                        f"SkyReels-V2's recommendation), got {sampling.addnoise_condition:g}")
    for name in ("window_frames", "overlap_frames"):
        value = getattr(sampling, name)
        if value is not None and (value < 1 or (value - 1) % temporal):
            raise UserError(f"sampling.{name} must be {temporal}k+1 frames, got {value}")
    if getattr(sampling, "extend", None) is not None and sampling.overlap_frames is None:
        raise UserError("sampling.extend needs sampling.overlap_frames: the given video's last frames each "
                        "window continues from (17 or 37 recommended)")
    if sampling.frames > sampling.window_frames and sampling.overlap_frames is None:
        raise UserError(f"sampling.overlap_frames is required when sampling.frames ({sampling.frames}) exceeds "
                        f"sampling.window_frames ({sampling.window_frames}): each window continues from the last "
                        f"frames of the one before (17 or 37 recommended)")
    windows = Windows.of(sampling, temporal=temporal, block=block)
    if windows.long and windows.overlap >= windows.base:
        raise UserError(f"sampling.overlap_frames ({sampling.overlap_frames}) must be fewer than "
                        f"sampling.window_frames ({sampling.window_frames}) and than sampling.frames "
                        f"({sampling.frames}): a window must add frames")
    if block > 1:
        for k in range(windows.count):
            if windows.size(k) % block:
                raise UserError(
                    f"{title}: window {k + 1} of {windows.count} has {windows.size(k)} latent frames, not a "
                    f"multiple of sampling.causal_block_size {block} (each window's latent frames, "
                    f"(frames - 1) / {temporal} + 1, must divide into causal blocks)")


@dataclass
class WindowStep:
    """Where the render is: window `window` of `windows`, row `row` of `rows` in it."""

    window: int
    windows: int
    row: int
    rows: int


def frame_schedulers(scheduler, frames: int, steps: int, device: torch.device, sigmas) -> list:
    """One copy of the scheduler per latent frame, each with the run's timesteps (as diffusers)."""
    copies = []
    for _ in range(frames):
        each = copy.deepcopy(scheduler)
        if sigmas is not None:
            each.set_timesteps(sigmas=list(sigmas), device=device)
        else:
            each.set_timesteps(steps, device=device)
        copies.append(each)
    return copies


def eta_text(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds))) if math.isfinite(seconds) else "?"


def window_bar(total: int, *, progress: bool):
    """The whole video's bar (its ETA is the whole video's); its description names the window."""
    return tqdm(total=total, desc="window", unit="step", disable=not progress, leave=False)


class WindowStore:
    """The finished windows' new latent frames, in order, held so that memory does not grow with
    the video: on this rank's disk (Checkpoints.window_path, committed as each window ends, so a
    resumed render reads them instead of recomputing) when a checkpoint folder exists, else in
    memory; a rank that needs no latents (not the writer, decoding) keeps none."""

    def __init__(self, checkpoints=None, *, keep: bool = True):
        self.checkpoints, self.keep = checkpoints, keep
        self.held: list[torch.Tensor] = []
        self.count = 0

    def add(self, piece: torch.Tensor) -> None:
        if self.keep and self.checkpoints is not None:
            from unison.engine.io.checkpoint import mark_folder
            from unison.engine.io.writes import commit, torch_write

            mark_folder(self.checkpoints.folder)
            commit(torch_write(self.checkpoints.window_path(self.count), piece.detach().to("cpu", copy=True)))
        elif self.keep:
            self.held.append(piece)
        self.count += 1

    def resume(self, count: int) -> None:
        """Windows 0..count-1 finished before the checkpoint resumed from (their files are there)."""
        if self.keep and self.checkpoints is not None:
            missing = [k for k in range(count) if not self.checkpoints.window_path(k).is_file()]
            if missing:
                raise RuntimeError(f"the step checkpoint in {self.checkpoints.folder} is after window {count}, but "
                                   f"the latents of window {missing[0] + 1} are gone")
        self.count = count

    def pieces(self, device: torch.device | None = None):
        """Each finished window's latents in order, one at a time."""
        if not self.keep:
            raise RuntimeError("this rank kept no latents of its windows")
        for k in range(self.count):
            if self.checkpoints is None:
                yield self.held[k]
            else:
                piece = torch.load(self.checkpoints.window_path(k), map_location="cpu", weights_only=True)
                yield piece if device is None else piece.to(device)

    def latents(self, device: torch.device | None = None) -> torch.Tensor:
        """The whole video's latents (held whole: for output.save_latents and callers that want them)."""
        return torch.cat(list(self.pieces(device)), dim=2)


class _Cursor:
    """The loop's state at a row boundary: what a checkpoint saves beside the latents."""

    def __init__(self):
        self.window = 0
        self.frame_steps: list = []
        self.history: torch.Tensor | None = None
        self.noise = torch.Generator(device="cpu")
        self.addnoise = torch.Generator(device="cpu")

    def extra(self) -> dict:
        from unison.engine.io.checkpoint import scheduler_state

        return {"window": self.window, "frame_schedulers": [scheduler_state(s) for s in self.frame_steps],
                "history": self.history, "noise_rng": self.noise.get_state(), "addnoise_rng": self.addnoise.get_state()}


def denoise_windows(pipe, spec, sampling, *, device: torch.device, progress: bool = False, on_step=None,
                    on_phase=None, runtime=None, guidance=None, caches: dict | None = None, offload=None,
                    checkpoints=None, stop=None, keep_latents: bool = True):
    """engine.loop.denoise for a diffusion-forcing family (the same arguments and result; the
    result's `windows` holds the latents window by window, `latents` the last window's).
    `keep_latents`: this rank needs the video's latents (to decode, save or return them)."""
    from unison.engine import loop as steps_loop
    from unison.engine.io.checkpoint import load_scheduler_state
    from unison.parallel.cfg import Guidance

    caches, guidance, hooks = caches or {}, guidance or Guidance(), spec.hooks
    watchers_all = [*caches.values(), *([runtime] if runtime is not None else [])]
    for watcher in watchers_all:
        watcher.reset()
    started = time.perf_counter()
    if on_phase is not None:
        on_phase("encoding", 0, sampling.steps)
    with torch.no_grad(), offload.encoding() if offload is not None else contextlib.nullcontext():
        conditioning = hooks.encode(pipe, sampling, device)
    encode_seconds = time.perf_counter() - started
    timesteps = hooks.set_timesteps(pipe, sampling.steps, device, sampling.sigmas)
    model = getattr(pipe, spec.experts[0])
    hooks.set_block(pipe, sampling.causal_block_size)
    windows = Windows.of(sampling, temporal=pipe.vae_scale_factor_temporal, block=sampling.causal_block_size)
    first = hooks.first_prefix(conditioning)  # the picture's latent frame, or an extended video's last frames
    ready = [windows.prefix(0) if windows.extend else first.shape[2] if first is not None else 0] + \
        [windows.prefix(k) for k in range(1, windows.count)]
    end = hooks.end_frames(conditioning)  # a last frame's latents, given at the end of the last window
    ends = [0] * (windows.count - 1) + [end.shape[2] if end is not None else 0]
    plan = [hooks.step_matrix(windows.size(k) + ends[k], timesteps, ar_step=sampling.ar_step, ready=ready[k],
                              base=(windows.size(k) if hooks.base_is_window(sampling) else windows.base) + ends[k],
                              block=sampling.causal_block_size) for k in range(windows.count)]
    if end is not None:  # diffusers' end frame: timestep 0, never stepped
        matrix, mask, intervals = plan[-1]
        matrix, mask = matrix.clone(), mask.clone()
        matrix[:, -ends[-1]:], mask[:, -ends[-1]:] = 0, False
        plan[-1] = (matrix, mask, intervals)
    starts = [sum(len(m) for m, _, _ in plan[:k]) for k in range(windows.count)]
    total = sum(len(matrix) for matrix, _, _ in plan)
    guidance.check(two_branches=conditioning.uncond is not None)
    cursor = _Cursor()
    cursor.noise.manual_seed(sampling.seed)
    cursor.addnoise.manual_seed(sampling.seed)
    store = WindowStore(checkpoints, keep=keep_latents)
    start, latents, resumed = 0, None, None
    if checkpoints is not None:  # after the caches' reset: the saved state replaces theirs
        resumed = checkpoints.restore(None, caches, device)
    if resumed is not None:
        start, latents, extra = resumed.step, resumed.latents, resumed.extra
        cursor.window, cursor.history = extra["window"], extra["history"]
        cursor.history = cursor.history.to(device) if cursor.history is not None else None
        cursor.noise.set_state(extra["noise_rng"])
        cursor.addnoise.set_state(extra["addnoise_rng"])
        store.resume(cursor.window)
    resumed_window = cursor.window if resumed is not None else None
    finite, timing = steps_loop.FiniteCheck(device, total), steps_loop.Timing(device)
    bar = window_bar(total, progress=progress)
    step_hooks = [*([steps_loop.Phases(on_phase)] if on_phase is not None else []), steps_loop.Finite(finite),
                  timing, *([steps_loop.Offloading(offload)] if offload is not None else []),
                  steps_loop.Bar(bar, start),
                  steps_loop.Checkpointing(checkpoints, stop, pipe=None, caches=caches, finite=finite, on_phase=on_phase,
                                           extra=cursor.extra),
                  *([steps_loop.Reports(on_step, timing)] if on_step is not None else [])]
    decisions: dict[str, list[list[tuple]]] = {name: [] for name in caches}
    window_seconds: list[float] = []
    shape = hooks.latent_shape(pipe, sampling)
    with torch.no_grad(), bar:
        for k, (matrix, mask, intervals) in enumerate(plan):
            if k < cursor.window:  # finished before the checkpoint this render resumed from
                continue
            opened = time.perf_counter()
            size, given = windows.size(k), ready[k]
            first_row = start - starts[k] if resumed is not None and k == cursor.window else 0
            cursor.frame_steps = frame_schedulers(pipe.scheduler, size + ends[k], sampling.steps, device,
                                                  sampling.sigmas)
            if first_row == 0:
                cursor.window = k
                latents = torch.randn((*shape[:2], size, *shape[2:]), generator=cursor.noise,
                                      dtype=torch.float32).to(device)
                if given:  # diffusers rounds what is given to the transformer's dtype
                    latents[:, :, :given] = (first if k == 0 else cursor.history)[:, :, :given].to(model.dtype)
                if ends[k]:
                    latents = torch.cat([latents, end.to(model.dtype)], dim=2)
                if k > 0 or resumed is not None:
                    for watcher in watchers_all:  # a new window is a new video to the caches
                        watcher.reset()
            else:  # resumed inside this window: its schedulers and caches come from the checkpoint
                for each, state in zip(cursor.frame_steps, resumed.extra["frame_schedulers"]):
                    load_scheduler_state(each, state, device)
                if runtime is not None:
                    runtime.reset()
            for cache in caches.values():
                cache.begin_video(steps=len(matrix))
            bar.set_description(f"window {k + 1}/{windows.count}")
            if on_phase is not None:
                on_phase("window", k + 1, windows.count)
            if progress and window_seconds:  # rank 0: the windows so far and the whole video's ETA
                ran, spent = starts[k] - start, sum(window_seconds)
                tqdm.write(f"unison: window {k + 1}/{windows.count}; the last {len(window_seconds)} took {spent:.1f} s "
                           f"({spent / len(window_seconds):.1f} s each), about "
                           f"{eta_text(spent / max(ran, 1) * (total - starts[k]))} to go", file=sys.stderr)
            host_rows, host_mask = matrix.tolist(), mask.tolist()
            for row, (t, (begin, end)) in enumerate(zip(matrix, intervals)):
                if row < first_row:
                    continue
                stepped = [i for i in range(begin, end) if host_mask[row][i]]
                timestep = float(max(host_rows[row][i] for i in stepped)) if stepped else 0.0
                step = steps_loop.Step(starts[k] + row, total, timestep, spec.experts[0],
                                       WindowStep(window=k, windows=windows.count, row=row, rows=len(matrix)))
                for hook in step_hooks:
                    hook.before(step)
                x = latents[:, :, begin:end].to(model.dtype).clone()
                t_in = t.expand(latents.shape[0], -1)[:, begin:end].clone()
                if sampling.addnoise_condition > 0 and begin < given:
                    factor = 0.001 * sampling.addnoise_condition
                    part = x[:, :, begin:given]
                    fresh = torch.randn(part.shape, generator=cursor.addnoise, dtype=part.dtype).to(device)
                    x[:, :, begin:given] = part * (1.0 - factor) + fresh * factor
                    t_in[:, begin:given] = sampling.addnoise_condition
                watchers = [w for w in (caches.get(step.expert), runtime) if w is not None]
                for watcher in watchers:
                    watcher.begin_step(row, timestep)

                def predict(context: str) -> torch.Tensor:
                    for watcher in watchers:
                        watcher.set_context(context)
                    branch = conditioning.cond if context == "cond" else conditioning.uncond
                    return model(hidden_states=x, timestep=t_in, return_dict=False, **branch)[0]

                noise = guidance.noise(predict, two_branches=conditioning.uncond is not None,
                                       scale=conditioning.scales[0])
                for i in stepped:
                    latents[:, :, i] = cursor.frame_steps[i].step(noise[:, :, i - begin], t[i], latents[:, :, i],
                                                                  return_dict=False)[0]
                for hook in step_hooks:
                    hook.after(step, latents)
            piece = latents if k == 0 else latents[:, :, windows.overlap:]  # an extension keeps its first window whole
            store.add(piece)
            if windows.long:
                joined = piece if cursor.history is None else torch.cat([cursor.history, piece], dim=2)
                cursor.history = joined[:, :, -windows.overlap:]
            for name, cache in caches.items():
                decisions[name].append(list(cache.decisions))
            window_seconds.append(time.perf_counter() - opened)
    for hook in step_hooks:
        hook.end()
    return steps_loop.LoopResult(latents=latents, steps=timing.records, encode_seconds=encode_seconds,
                                 resumed_from_step=start if start else None,
                                 windows=WindowRecord(store=store, count=windows.count, seconds=window_seconds,
                                                      decisions=decisions, resumed_window=resumed_window))


@dataclass
class WindowRecord:
    """What a diffusion-forcing render leaves beside the loop's result."""

    store: WindowStore
    count: int
    seconds: list[float]
    """Wall seconds of each window this render ran (a resumed render: from the one it resumed in)."""
    decisions: dict[str, list[list[tuple]]]
    """Per expert, per window this render ran: the cache's decisions (step counted in the window)."""
    resumed_window: int | None = None
