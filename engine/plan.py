"""Plan a run: validate everything, resolve defaults, read no weights (`plan_run`), with the
engine's layout rules in one place (`structure_problem`, `heads_problem`), which `unison plan`
applies too. Loading is engine/load.py's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unison.caching import registry
from unison.engine.config import CacheConfig, ModelConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.errors import UserError
from unison.engine import images, lora, schedulers, windows
from unison.engine.models import SPECS, ModelSpec, detect_family, get_spec, read_json, read_model_index
from unison.engine.cache_presets import resolve as resolve_preset
from unison.engine.limits import TIMEOUT_RANGE_S, check_finite, check_limits, check_seeds, config_reader
from unison.engine.offload import Offloader, offloader_for
from unison.engine.placement import Placement, check_attention_backend, check_compile, place, visible_gpus
from unison.engine.precision import DTYPES, class_has_fp32_islands, resolve_dtype
from unison.engine.targets import check_output, picture_reads
from unison.parallel.attention import check_heads

@dataclass(frozen=True)
class Plan:
    """Everything decided before any weights are loaded."""

    config: RunConfig
    """The resolved config: family detected, sampling defaults filled, dtype and device concrete."""
    spec: ModelSpec
    placement: Placement
    """This rank's device (cuda:local_rank % GPUs, or cpu) and the process-group backend for it."""
    model_index: dict[str, Any] | None
    """The folder's model_index.json, or None for a tiny in-process preset."""
    world_size: int = 1
    notes: tuple[str, ...] = ()
    """What was resolved from the model folder rather than given, one line each (a cache preset
    detected from the transformer's config.json), for rank 0 to print."""

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def is_tiny(self) -> bool:
        return self.config.model.path is None

    def describe(self) -> list[str]:
        c, s = self.config, self.config.sampling
        source = "tiny random-weight preset (in-process)" if self.is_tiny else c.model.path
        lines = [
            f"model      {self.spec.title} [{self.spec.family}] from {source}",
            f"device     {c.model.device}, {c.model.dtype} (VAE {c.model.vae_dtype})",
            f"components {self.components()}",
            f"video      {s.width}x{s.height}, {s.frames} frames at {c.output.fps or self.spec.fps} fps, "
            f"{s.steps} steps, seed {s.seed}",
            f"guidance   {_guidance_text(self.spec, s)}",
            f"parallel   ulysses {c.parallel.ulysses} x ring {c.parallel.ring} x cfg {c.parallel.cfg} "
            f"x patch {c.parallel.patch}" + _shard_text(c.parallel, self.world_size),
            f"output     {c.output.path if c.output.decode else '(no video)'}"
            + (f", latents to {c.output.save_latents}" if c.output.save_latents else ""),
        ]
        tokens = self.video_tokens()
        if tokens is not None:
            lines.insert(3, f"tokens     {tokens} video tokens per branch, {s.max_sequence_length} text tokens")
        if s.image is not None:
            last = f", last frame {s.last_image}" if s.last_image is not None else ""
            lines.insert(lines.index(next(l for l in lines if l.startswith("guidance"))),
                         f"image      {s.image}{last} ({s.image_resize} to {s.width}x{s.height})")
        if self.spec.forcing:
            w = windows.Windows.of(s, temporal=self.spec.temporal_factor, block=s.causal_block_size)
            rows = windows.rows(s, self.spec.hooks, temporal=self.spec.temporal_factor)
            mode = f"asynchronous (ar_step {s.ar_step}, causal blocks of {s.causal_block_size})" if s.ar_step \
                else "synchronous"
            lines.insert(lines.index(next(l for l in lines if l.startswith("guidance"))),
                         f"windows    {w.count} of {s.window_frames} frames"
                         + (f", {s.overlap_frames} overlapping" if w.long else "") + f", {sum(rows)} forwards; {mode}"
                         + (f"; addnoise_condition {s.addnoise_condition:g}" if s.addnoise_condition else "")
                         + (f"; extends {s.extend}" if s.extend else ""))
        if (s.scheduler, s.flow_shift) != ("default", None):
            shift = f", flow shift {s.flow_shift}" if s.flow_shift is not None else ""
            lines.insert(lines.index(next(l for l in lines if l.startswith("guidance"))),
                         f"sampler    {s.scheduler}{shift}")
        return lines + [f"cache      {note}" for note in self.notes]

    def components(self) -> str:
        """Each component's dtype and device as load_pipeline will give them, from the config
        alone: experts and text encoders in model.dtype, the VAE in model.vae_dtype, float32
        islands named by the component's class (diffusers' transformer class; for a folder, the
        classes its model_index.json names), idle modules on the CPU under model.offload."""
        model = self.config.model
        idle = offloader_for(self, None).idle()
        parts = []
        for name in (*self.spec.experts, *self.spec.text_encoders, "vae"):
            dtype = model.vae_dtype if name == "vae" else "float32" if name == "image_encoder" else model.dtype
            if name in self.spec.experts:
                library, class_name = "diffusers", self.spec.transformer_class
            else:
                entry = (self.model_index or {}).get(name)
                library, class_name = entry if isinstance(entry, list) else (None, None)
            islands = class_has_fp32_islands(library, class_name, DTYPES[dtype])
            where = f"{Offloader.park} (offload)" if name in idle else str(self.device)
            parts.append(f"{name} {dtype}{' (+float32 islands)' if islands else ''} on {where}")
        return ", ".join(parts)

    def video_tokens(self) -> int | None:
        """Transformer sequence length of the video, read from the folder's configs (None for tiny)."""
        if self.model_index is None:
            return None
        root = Path(self.config.model.path)
        try:
            tcfg = read_json(root / self.spec.experts[0] / "config.json")
            vcfg = read_json(root / "vae" / "config.json")
        except UserError:
            return None
        if not isinstance(tcfg, dict) or not isinstance(vcfg, dict):
            return None
        spatial = vcfg.get("scale_factor_spatial") or vcfg.get("spatial_compression_ratio") or 8
        temporal = vcfg.get("scale_factor_temporal") or vcfg.get("temporal_compression_ratio") or 4
        patch = tcfg.get("patch_size")
        s = self.config.sampling
        try:  # a hand-edited config.json may hold anything; the count is only informative
            pt, ph, pw = (patch if isinstance(patch, list) else (tcfg.get("patch_size_t", 1), patch, patch))
            frames = (s.frames - 1) // temporal + 1
            return int((frames // pt) * (s.height // spatial // ph) * (s.width // spatial // pw))
        except (TypeError, ValueError, ZeroDivisionError):
            return None


def _shard_text(p: ParallelConfig, world_size: int) -> str:
    if not p.shard_weights:
        return ""
    if world_size == 1:
        return ", shard_weights ignored (one rank: nothing to shard)"
    return f", block weights sharded over {world_size} ranks (FSDP2)"


def _guidance_text(spec: ModelSpec, s: SamplingConfig) -> str:
    two = spec.hooks.branches(s) == 2
    if spec.embedded_guidance:
        true = f", true CFG {s.true_cfg_scale or 1.0}" if two else ", no true CFG"
        return f"embedded {s.guidance}{true}"
    text = f"CFG {s.guidance}" if two else f"none (guidance {s.guidance} <= 1)"
    if spec.two_experts:
        text += f"; low-noise expert {s.guidance_2}"
    return text


def _resolve_family(model: ModelConfig) -> tuple[str, dict | None]:
    if model.path is None:
        if model.family == "auto":
            raise UserError("model.family must name a family for the tiny preset, or give --model DIR")
        get_spec(model.family)
        return model.family, None
    index = read_model_index(model.path)
    found = detect_family(index)
    if model.family not in ("auto", found):
        raise UserError(
            f"{model.path} holds a {found} model ({index.get('_class_name')}), but the config says "
            f"model.family={model.family}"
        )
    for part in get_spec(found).experts:
        if not (Path(model.path) / part / "config.json").is_file():
            raise UserError(f"{model.path} has no {part}/config.json: not a complete diffusers folder")
    return found, index


def _resolve_sampling(s: SamplingConfig, spec: ModelSpec, *, tiny: bool, read=None) -> SamplingConfig:
    """Unset sampling fields from the family's defaults; the size, where the family derives it
    (Hooks.default_size, from the folder's configs through `read`)."""
    d = spec.tiny_defaults if tiny else spec.defaults
    size = spec.hooks.default_size(s, read) if read is not None and s.height is None and s.width is None else None
    if size is not None:
        s = dataclasses.replace(s, height=size[0], width=size[1])
    if s.sigmas is not None and s.steps is None:
        s = dataclasses.replace(s, steps=len(s.sigmas))  # a schedule written out counts its steps
    filled = {name: getattr(d, name) for name in ("height", "width", "frames", "steps", "guidance",
                                                   "max_sequence_length")
              if getattr(s, name) is None}
    if s.image_resize == "auto":
        filled["image_resize"] = d.image_resize
    s = dataclasses.replace(s, **filled)
    if spec.two_experts and s.guidance_2 is None:
        # As in diffusers, an unset guidance_2 follows the guidance the user gave; with neither
        # given, both come from the family defaults.
        from_defaults = "guidance" in filled and d.guidance_2 is not None
        s = dataclasses.replace(s, guidance_2=d.guidance_2 if from_defaults else s.guidance)
    if spec.embedded_guidance and s.true_cfg_scale is None:
        s = dataclasses.replace(s, true_cfg_scale=d.true_cfg_scale)
    if spec.forcing:
        block = s.causal_block_size
        if block is None:  # the checkpoint's own (diffusers' default when the pipeline is given none)
            block = int(((read("transformer/config.json") if read is not None else {}) or {}).get(
                "num_frame_per_block", 1))
        s = dataclasses.replace(s, window_frames=min(s.window_frames or d.window_frames, s.frames),
                                causal_block_size=block)
    return s


def check_sampling(s: SamplingConfig, spec: ModelSpec) -> None:
    if s.steps < 1:
        raise UserError(f"sampling.steps must be at least 1, got {s.steps}")
    k = spec.temporal_factor
    if s.frames < 1 or (s.frames - 1) % k:
        near = max(1, (s.frames - 1) // k * k + 1)
        raise UserError(
            f"{spec.title} takes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ..., 81, ...); got {s.frames}, "
            f"try {near} or {near + k}"
        )
    m = spec.size_multiple
    for name in ("height", "width"):
        value = getattr(s, name)
        if value < m or value % m:
            raise UserError(f"sampling.{name} must be a positive multiple of {m} for {spec.title}, got {value}")
    if s.guidance < 0:
        raise UserError(f"sampling.guidance must be >= 0, got {s.guidance}")
    if s.max_sequence_length < 1:
        raise UserError(f"sampling.max_sequence_length must be at least 1, got {s.max_sequence_length}")
    if s.sigmas is not None:
        schedulers.check_sigmas(s.sigmas, steps=s.steps, scheduler=s.scheduler)
    if spec.forcing:
        windows.check(s, temporal=k, block=s.causal_block_size, title=spec.title)
    else:
        for name, unset in _FORCING_FIELDS.items():
            if getattr(s, name) != unset:
                forcing = ", ".join(family for family, other in SPECS.items() if other.forcing)
                raise UserError(f"sampling.{name} is for diffusion forcing ({forcing}); {spec.title} renders a "
                                f"video in one pass")
    spec.hooks.check_sampling(s)


_FORCING_FIELDS = {"window_frames": None, "overlap_frames": None, "addnoise_condition": 0.0, "ar_step": 0,
                   "causal_block_size": None, "fps": None, "extend": None}
"""The sampling fields only diffusion forcing reads, unset."""


def parallel_dims(p: ParallelConfig, *, world_size: int):
    """The ParallelDims of a parallel config; it validates the degrees (one place for the rules)."""
    from unison.parallel.dims import ParallelDims

    return ParallelDims(cfg=p.cfg, patch=p.patch, ring=p.ring, ulysses=p.ulysses, world_size=world_size)


def check_parallel(p: ParallelConfig, *, world_size: int) -> None:
    parallel_dims(p, world_size=world_size)
    low, high = TIMEOUT_RANGE_S
    if not low <= p.timeout_s <= high:
        raise UserError(f"parallel.timeout_s must be between {low:g} and {high:g} seconds, got {p.timeout_s:g}: "
                        f"below, ranks that start a few seconds apart miss the rendezvous; above, a hung "
                        f"collective goes unnoticed for days")
    if p.patch_warmup_steps < 0:
        raise UserError(f"parallel.patch_warmup_steps must be at least 0, got {p.patch_warmup_steps}")
    if p.pipefusion_patches is not None and p.pipefusion_patches < 1:
        raise UserError(f"parallel.pipefusion_patches must be at least 1 (or null), got {p.pipefusion_patches}")


def structure_problem(p, *, spec: ModelSpec, branches: int, guidance: float | None = None) -> str | None:
    """The first of the engine's layout rules that do not depend on the model's size which `p`
    breaks, as one line (None: none). `p` is a ParallelConfig or the planner's Layout (ulysses,
    ring, cfg, patch, patch_mode, shard_weights): plan_run raises it, `unison plan` never offers
    such a layout. `branches`: guidance branches per step (`guidance`, if known, for the message)."""
    if p.patch_mode == "pipefusion" and p.patch == 1:
        return ("parallel.patch_mode=pipefusion (--pipefusion) needs patch parallelism: give parallel.patch "
                "(--patch N) above 1, or leave --pipefusion out")
    if p.patch > 1 and p.ring > 1:
        return (f"patch parallelism does not combine with ring (got patch {p.patch}, ring {p.ring}): "
                f"ring exists to not hold the whole sequence's K/V, and the stale K/V buffers hold it "
                f"anyway; use ulysses inside the patch")
    if p.patch > 1 and p.patch_mode == "pipefusion" and p.ulysses > 1:
        return (f"PipeFusion combines with cfg parallel only (got patch {p.patch}, ulysses {p.ulysses}): "
                f"use parallel.patch_mode=displaced to combine patches with ulysses")
    if (p.ulysses > 1 or p.ring > 1) and spec.token_plan is None:
        return f"sequence parallelism (ulysses/ring) is not supported for {spec.title} yet"
    if p.cfg > 1 and branches < 2:
        if spec.embedded_guidance:
            return (f"CFG parallel needs two guidance branches; {spec.title} uses embedded guidance (one branch) "
                    "unless sampling.true_cfg_scale > 1 with a negative prompt")
        return "CFG parallel needs classifier-free guidance (guidance > 1)" + \
            (f", got {guidance}" if guidance is not None else "")
    if p.patch > 1 and not (spec.pipefusion if p.patch_mode == "pipefusion" else spec.displaced_patches):
        return f"patch parallelism (mode {p.patch_mode}) is not supported for {spec.title}"
    if p.shard_weights and p.patch > 1:
        return (f"parallel.shard_weights does not combine with patch parallelism (patch {p.patch}): "
                f"displaced patches keep whole blocks per rank and PipeFusion already splits the blocks "
                f"into stages; use shard_weights with ulysses, ring or cfg")
    return None


def blocks_problem(p, blocks: list[int]) -> str | None:
    """PipeFusion needs a block per stage, on every expert."""
    if p.patch > 1 and p.patch_mode == "pipefusion" and blocks and p.patch > min(blocks):
        return f"PipeFusion needs a block per stage: {min(blocks)} blocks, {p.patch} stages"
    return None


def heads_problem(ulysses: int, heads: list[int]) -> str | None:
    """Ulysses splits the heads: its degree must divide every expert's head count."""
    for count in heads:
        try:
            check_heads(count, ulysses)
        except UserError as err:
            return str(err)
    return None


def check_cache(c: CacheConfig, p: ParallelConfig, *, steps: int, prefix: str = "cache", family: str = "",
                read=None) -> None:
    """The cache kind's whole-config checks, those against the run (its steps), the model (the
    kind's `check_model`, on the folder's config files through `read`) and the modes it supports,
    as UserErrors before anything loads (each field was checked when the config was built).
    `prefix` names the section in messages (cache, or cache_2 for Wan 2.2's low-noise expert)."""
    try:
        c.check_complete()
        c.check_run(steps=steps)
    except ValueError as err:
        raise UserError(f"{prefix}.{err}") from None
    kind = registry.get(c.kind) if c.kind != registry.NONE else None
    if kind is not None and kind.check_model is not None and read is not None:
        try:
            kind.check_model(family, read)
        except ValueError as err:
            raise UserError(f"{prefix}: {err}") from None
    pipefusion = p.patch > 1 and p.patch_mode == "pipefusion"
    if pipefusion and c.kind != registry.NONE and not registry.get(c.kind).pipefusion:
        able = " or ".join(f"cache.kind={k.name}" for k in registry.KINDS.values() if k.pipefusion)
        raise UserError(f"{registry.title(c)} under PipeFusion is not supported: use {able} "
                        f"or parallel.patch_mode=displaced")


def plan_run(config: RunConfig, *, world_size: int = 1, local_rank: int = 0, gpus: int | None = None,
             reads: dict[str, str] | None = None) -> Plan:
    """Validate `config` and resolve every default; reads only small JSON files, never weights.
    `local_rank` picks this rank's GPU; `gpus` (default: the GPUs visible here) is for tests;
    `reads` names files the command read beyond the config's own (the input recipe), which no
    output may land on."""
    check_finite(config)
    family, index = _resolve_family(config.model)
    spec = get_spec(family)
    placement = place(config.model.device, world_size=world_size, local_rank=local_rank,
                      gpus=visible_gpus() if gpus is None else gpus)
    device = placement.device
    dtype = resolve_dtype(config.model.dtype, device)
    # The resolved config records the device type (each rank picks its own GPU from it), or the
    # one GPU a one-rank run was pinned to.
    pinned = ":" in config.model.device
    model = dataclasses.replace(
        config.model, family=family, device=str(device) if pinned else placement.kind, dtype=dtype,
        vae_dtype=resolve_dtype(config.model.vae_dtype, device, fallback=dtype),
    )
    sampling = _resolve_sampling(config.sampling, spec, tiny=config.model.path is None,
                                 read=config_reader(config.model, spec))
    check_sampling(sampling, spec)
    sampling = images.with_hashes(sampling)  # the resolved config records each picture's SHA-256
    check_seeds(sampling, config.model)
    check_limits(sampling, spec, config.model)
    if config.parallel.auto:
        raise UserError("parallel.auto is resolved by `unison generate` and `unison batch` under torchrun, srun or "
                        "one process; with --ray give the degrees (see `unison plan`)")
    check_parallel(config.parallel, world_size=world_size)
    if config.output.checkpoint_every < 0:
        raise UserError(f"output.checkpoint_every must be at least 0 (0: off), got {config.output.checkpoint_every}")
    if world_size > 1 and config.output.decode and config.output.parallel_decode and not spec.parallel_vae:
        raise UserError(f"output.parallel_decode: {spec.title}'s VAE decode cannot be spread over the ranks; set "
                        "output.parallel_decode=false (rank 0 decodes alone)")
    p = config.parallel
    problem = structure_problem(p, spec=spec, branches=spec.hooks.branches(sampling), guidance=sampling.guidance) \
        or spec.hooks.layout_problem(sampling, p)
    if problem is not None:
        raise UserError(problem)
    # A MagCache or TeaCache that names no preset and no numbers of its own gets the preset
    # published for the folder's model (engine/cache_presets.py), named in the resolved config.
    read, notes = config_reader(config.model, spec), []
    cache, note = resolve_preset(config.cache, spec=spec, model=config.model, sampling=sampling, read=read)
    notes += [note] if note else []
    check_cache(cache, p, steps=forwards_per_video(sampling, spec), family=spec.family, read=read)
    cache_2 = config.cache_2
    if cache_2 is not None:
        if not spec.two_experts:
            raise UserError(f"cache_2 is the low-noise expert's cache of Wan 2.2 A14B; {spec.family} has one "
                            f"transformer, so use cache alone")
        cache_2, note = resolve_preset(cache_2, spec=spec, model=config.model, sampling=sampling, read=read,
                                       prefix="cache_2")
        notes += [note] if note else []
        check_cache(cache_2, p, steps=sampling.steps, prefix="cache_2", family=spec.family, read=read)
    problem = heads_problem(p.ulysses, _attention_heads(config.model, spec)) or \
        blocks_problem(p, [spec.block_count(read(f"{expert}/config.json")) for expert in spec.experts])
    if problem is not None:
        raise UserError(problem)
    check_attention_backend(p.attention_backend, device, ring=p.ring)
    if p.attention_backend == "xfuser" and (p.patch > 1 or spec.joint_text):
        raise UserError("parallel.attention_backend=xfuser runs exact sequence parallelism (ulysses/ring) for Wan "
                        "only: patch parallelism keeps its own K/V buffers and HunyuanVideo's joint attention "
                        "masks padded text, which xfuser's layer cannot; use flash-attn or sdpa")
    check_compile(config.model.compile, device)
    check_output(config.output, model_path=config.model.path,
                 reads={**(reads or {}), **picture_reads(config.sampling)})
    output = dataclasses.replace(config.output, fps=config.output.fps or sampling.fps or spec.fps)
    if spec.forcing and sampling.fps is None:  # the model is told the rate the video is written at
        sampling = dataclasses.replace(sampling, fps=output.fps)
    if spec.forcing:  # decoded window by window on rank 0, the causal VAE's cache carried (engine/render.py)
        if output.vae_tiling:
            raise UserError("output.vae_tiling: diffusion forcing decodes window by window, untiled (its memory "
                            "does not grow with the video's length); leave vae_tiling off")
        output = dataclasses.replace(output, parallel_decode=False)
    # Each LoRA's file checked and its SHA-256 recorded; with a folder, its layers against the
    # transformer's config.json (engine/lora.py).
    loras = lora.check(config.lora, spec, read=config_reader(config.model, spec) if config.model.path else None)
    resolved = dataclasses.replace(config, model=model, sampling=sampling, output=output, cache=cache, cache_2=cache_2,
                                   lora=loras)
    return Plan(config=resolved, spec=spec, placement=placement, model_index=index, world_size=world_size,
                notes=tuple(notes))


def forwards_per_video(s: SamplingConfig, spec: ModelSpec) -> int:
    """The steps a cache counts in one pass: the steps, or a diffusion-forcing window's rows (the
    most of any window; asynchronous windows take more rows than steps)."""
    if not spec.forcing:
        return s.steps
    return max(windows.rows(s, spec.hooks, temporal=spec.temporal_factor))


def _attention_heads(model: ModelConfig, spec: ModelSpec) -> list[int]:
    """Attention heads of each expert transformer, from the folder's config.json (no weights)."""
    if model.path is None:
        return [spec.tiny_heads]
    heads = []
    for part in spec.experts:
        config_file = Path(model.path) / part / "config.json"
        try:
            heads.append(int(read_json(config_file)["num_attention_heads"]))
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{config_file}: cannot read num_attention_heads ({err})") from None
    return heads
