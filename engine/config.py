"""Run configuration: one frozen, keyword-only dataclass per component, loaded strictly.

Precedence, lowest first: dataclass defaults, the model family's defaults (for sampling
fields left unset), YAML (`--config`), command-line flags, `--set section.key=value`.
Unknown keys and wrong value types are `UserError`s that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unison.caching import registry
from unison.caching.base import CacheConfig
from unison.engine.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = "auto"
    """Model family (engine/models: `unison make-tiny --help` lists them), or auto (read from the folder)."""
    path: str | None = None
    """Local diffusers-format folder. None builds the family's tiny random-weight preset in-process."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the transformer and text encoders; auto is bfloat16 on a GPU, float32 on the CPU."""
    vae_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """VAE dtype; float32 by default, as diffusers' Wan examples load it. auto follows `dtype`."""
    device: str = "auto"
    """torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    tiny_seed: int = 0
    """Seed of the random weights of a tiny preset (ignored when `path` is set)."""
    compile: Literal["none", "blocks"] = "none"
    """torch.compile: none, or blocks (each transformer block compiled once, regionally, as
    diffusers' compile_repeated_blocks; cache decisions and collectives stay outside)."""
    offload: bool = False
    """Keep what is idle off the GPU: the text encoders go to the CPU once the prompts are
    encoded, and Wan 2.2 A14B's idle expert waits on the CPU while the other one runs."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    prompt: str = "A red panda eating bamboo in a quiet forest, soft morning light."
    """The text prompt."""
    negative_prompt: str | None = None
    """Negative prompt for classifier-free guidance (Wan; HunyuanVideo's true CFG)."""
    height: int | None = None
    """Video height in pixels; a multiple of 16 (32 for Wan 2.2 TI2V-5B). None: the family default."""
    width: int | None = None
    """Video width in pixels; same rule as height. None: the family default."""
    frames: int | None = None
    """Number of frames, 4k+1. None: the family default."""
    steps: int | None = None
    """Denoising steps (at least 1). None: the family default."""
    guidance: float | None = None
    """The pipeline's guidance_scale: CFG scale for Wan, embedded (distilled) guidance for HunyuanVideo."""
    guidance_2: float | None = None
    """Wan 2.2 two-expert only: CFG scale of the low-noise expert (guidance_scale_2); None means `guidance`."""
    true_cfg_scale: float | None = None
    """HunyuanVideo only: true classifier-free guidance scale (> 1 needs a negative prompt)."""
    seed: int = 0
    """Seed of the initial noise (a CPU generator, so every device and rank draws the same noise)."""
    max_sequence_length: int | None = None
    """Text tokens fed to the transformer. None: the family default (Wan 512, HunyuanVideo 256)."""
    image: str | None = None
    """Image-to-video: the first frame's picture (a path; a batch job's is relative to its JSONL
    file's folder). Required by the image-to-video families, refused by the text-to-video ones."""
    last_image: str | None = None
    """First-last-frame: the last frame's picture (Wan 2.1 FLF2V checkpoints, Wan 2.2 I2V A14B)."""
    image_sha256: str | None = None
    """The picture's SHA-256, recorded in the resolved config: a config that names one refuses a
    picture that changed since, and a changed picture never resumes another's checkpoint."""
    last_image_sha256: str | None = None
    """The same for the last frame's picture."""
    scheduler: Literal["default", "unipc", "dpm++", "deis", "euler"] = "default"
    """The sampler (engine/schedulers.py): default (the folder's), unipc, dpm++, deis or euler, each a
    diffusers flow-matching scheduler built from the folder's settings."""
    flow_shift: float | None = None
    """The sampler's flow shift (Wan: 3.0 at 480p, 5.0 at 720p). None: the folder's."""
    sigmas: tuple[float, ...] | None = None
    """The sampler's sigmas, one per step from 1 down, before its flow shift: a step-distilled
    model's published schedule (lightx2v's 4-step LoRAs: 1, 0.75, 0.5, 0.25); `steps` is their
    count. Needs a sampler that takes sigmas (euler, unipc). None: the sampler's own spacing."""
    image_resize: Literal["auto", "stretch", "crop", "pad"] = "auto"
    """How the picture meets height x width: stretch, crop (cover, cut the centre) or pad (fit
    inside, fill the rest); the aspect ratio is kept by crop and pad. auto: as the family's diffusers
    pipeline does (stretch; HunyuanVideo 1.5 crops)."""
    window_frames: int | None = None
    """Diffusion forcing (SkyReels-V2 DF) only: frames each window renders, 4k+1 (diffusers'
    base_num_frames; SkyReels-V2: 97 at 540P, 121 at 720P). A longer video is rendered window by
    window. None: the family default."""
    overlap_frames: int | None = None
    """Diffusion forcing only: frames of the window before that each later window continues from,
    4k+1 (diffusers' overlap_history; 17 or 37 recommended). Required when frames > window_frames."""
    addnoise_condition: float = 0.0
    """Diffusion forcing only: the timestep at which the frames a window continues from get fresh
    noise at every step, which smooths long videos (20 recommended, 0 off)."""
    ar_step: int = 0
    """Diffusion forcing only: 0 renders every frame of a window on one schedule (synchronous);
    above 0 each causal block starts ar_step steps after the one before (asynchronous, 5 recommended)."""
    causal_block_size: int | None = None
    """Diffusion forcing only: latent frames per causal block (5 recommended with ar_step > 0); every
    window's latent frames must divide into blocks. None: the checkpoint's num_frame_per_block."""
    extend: str | None = None
    """Diffusion forcing text-to-video only: a video (mp4 or any file ffmpeg reads) to continue, as
    diffusers' SkyReelsV2DiffusionForcingVideoToVideoPipeline does: its last overlap_frames frames
    are the first window's given frames, `frames` counts them too, and the written video is the
    given one (resized to height x width) followed by the frames - overlap_frames new ones. A batch
    job's is relative to its JSONL file's folder."""
    extend_sha256: str | None = None
    """The extended video's SHA-256, recorded in the resolved config (as image_sha256)."""
    fps: int | None = None
    """Diffusion forcing only: the frame rate the model is told (its fps embedding tells 16 from any
    other rate). None: output.fps, else the family's."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    ulysses: int = 1
    """Ulysses (all-to-all) sequence-parallel degree."""
    ring: int = 1
    """Ring-attention sequence-parallel degree."""
    cfg: int = 1
    """CFG-parallel degree: 1, or 2 to run the cond and uncond branches on two halves of the ranks."""
    patch: int = 1
    """Patch-parallel degree: each rank (displaced) or stage (pipefusion) works on contiguous
    ranges of the tokens, attending to the other patches' K/V from the previous step. Combines
    with cfg; displaced patches also with ulysses (inside each patch); never with ring."""
    patch_warmup_steps: int = 4
    """Patch parallel: the first steps exchange K/V synchronously and are exact (DistriFusion's
    default warm-up); later steps use one-step-stale K/V from the other patches."""
    patch_mode: Literal["displaced", "pipefusion"] = "displaced"
    """displaced: every rank holds every block and computes its patch of tokens; pipefusion: the
    blocks split into `patch` stages (about 1/N of the block weights per rank) and the tokens
    stream through them in patches."""
    pipefusion_patches: int | None = None
    """PipeFusion: patches per step after warm-up (null: the patch degree). More patches, smaller
    pipeline bubbles, smaller matmuls."""
    timeout_s: float = 300.0
    """Timeout of every process group, in seconds: a stuck collective fails instead of hanging."""
    shard_weights: bool = False
    """Shard the transformer blocks' weights across all the engine's ranks with torch's FSDP2
    (`fully_shard`), gathered block by block in the forward: about 1/N of the block weights per
    rank, for one all-gather of each block's weights per forward. The other weights (embeddings,
    output head: a few percent) stay whole on every rank. Combines with ulysses, ring, cfg and
    the step caches; not with patch parallelism. On one rank there is nothing to shard: the
    flag is accepted and changes nothing, so one recipe runs on any number of ranks."""
    auto: bool = False
    """Pick the layout `unison plan` recommends for the world size (`--parallel auto`): ulysses,
    ring, cfg, patch, patch_mode and shard_weights (and model.offload, output.vae_tiling where
    memory needs them) are set before the run, degrees above 1 given here are kept as
    constraints, and the resolved config records the choice (with auto false)."""
    attention_backend: Literal["auto", "sdpa", "flash-attn", "sage", "xfuser"] = "auto"
    """Local attention kernel: auto (flash-attn on a GPU when installed, else torch's sdpa),
    sdpa, flash-attn, sage (SageAttention) or xfuser (xDiT's long-context attention); the last
    three need a GPU and their package."""


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    path: str = "unison.mp4"
    """Where the mp4 goes; the resolved config is written beside it with a .yaml suffix."""
    save_latents: str | None = None
    """If set, torch.save the final latents (before VAE decode) here."""
    fps: int | None = None
    """Frame rate of the mp4. None: the family's (Wan 16, HunyuanVideo 24)."""
    decode: bool = True
    """Decode and write the video. False stops after the latents (useful with save_latents)."""
    vae_tiling: bool = False
    """Decode with the VAE's own spatial tiling (lower peak memory at 720p)."""
    parallel_decode: bool = True
    """When the engine has more than one rank, all ranks decode the VAE's tiles in parallel and
    rank 0 blends them (parallel/vae.py); implies tiling. False: rank 0 decodes alone."""
    progress: bool = True
    """Show a progress bar per step (rank 0 only)."""
    checkpoint_every: int = 0
    """Write a step checkpoint every this many denoising steps (0: never), so that a killed render
    resumes where it stopped and loses at most this many steps (engine/io/checkpoint.py)."""
    checkpoint_dir: str | None = None
    """Folder of the step checkpoints. None: beside the video, `<path>.ckpt/`. Removed once the
    render's results are written."""
    resume: Literal["auto", "require", "never"] = "auto"
    """auto: continue from a checkpoint of the same run (model, sampling, parallel layout, cache),
    ignore one of another run with a warning; require: refuse to start without one; never: start
    from step 0. Only renders with checkpoint_every > 0 (or require) look for checkpoints."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    path: str
    """The LoRA's .safetensors file, in any key format diffusers' loader for the family reads
    (diffusers/peft keys, the original repository's, kohya/musubi-style); a batch job's is relative
    to its JSONL file's folder."""
    scale: float = 1.0
    """Its strength (diffusers' set_adapters weight)."""
    expert: Literal["both", "high", "low"] | None = None
    """Wan 2.2 A14B only: the high-noise expert (`transformer`), the low-noise one (`transformer_2`)
    or both. None: both."""
    sha256: str | None = None
    """The file's SHA-256, recorded in the resolved config: a config that names one refuses a file
    that changed since, and a changed file never resumes another's checkpoint."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model, where its weights are, dtype and device."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """What to render and how: prompt, size, frames, steps, guidance, seed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How ranks split the work."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Which step cache skips redundant work, and how much: `kind` and that kind's own fields
    (caching/registry.py lists the kinds; each kind's config class its fields). On Wan 2.2 A14B
    it is the high-noise expert's (`transformer`), and the low-noise one's too unless cache_2 is set."""
    cache_2: CacheConfig | None = None
    """Wan 2.2 two-expert only: the low-noise expert's (`transformer_2`) cache, any kind, read as
    `cache` is; a mapping without `kind` starts from `cache` (its kind and fields). None: `cache`."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    lora: tuple[LoraConfig, ...] = ()
    """LoRA adapters fused into the transformer's weights for this render, a list of {path, scale,
    expert} (or "PATH[:SCALE]" strings); an engine switches them between renders (engine/lora.py)."""


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_class(name: str) -> type:
    return {"model": ModelConfig, "sampling": SamplingConfig,
            "parallel": ParallelConfig, "cache": CacheConfig, "output": OutputConfig}[name]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _takes_float(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        return any(_takes_float(arg) for arg in typing.get_args(tp))
    return tp is float


_NON_FINITE_WORDS = {"nan", "inf", "infinity"}


def _not_finite(value: Any) -> bool:
    """NaN or infinity: a float, an int too large for a float, or text that spells one
    (`--set x=nan` reaches us as text, since YAML spells them .nan and .inf)."""
    if isinstance(value, (list, tuple)):
        return any(_not_finite(v) for v in value)
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return True
        return False
    if isinstance(value, str):
        return value.strip().lower().lstrip("+-.") in _NON_FINITE_WORDS
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected.
    A float field never takes NaN or infinity (from YAML's .nan/.inf, JSON's NaN/Infinity/1e400,
    a flag such as --guidance nan, or an integer beyond float range): guidance NaN would silently
    mean "no CFG", infinity renders black, a NaN cache threshold skips every step."""
    if _takes_float(tp) and _not_finite(value):
        raise UserError(f"{key} must be a finite number, got {_short(value)}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, str):  # `--set cache.mag_ratios=[1.0, 0.99]` arrives as text
            try:
                value = yaml.safe_load(value)
            except (yaml.YAMLError, ValueError):
                pass
        if isinstance(value, (list, tuple)):
            item = typing.get_args(tp)[0]
            return tuple(_coerce(v, item, key) for v in value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {_short(value)}")


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error message stays one readable line."""
    if isinstance(value, int) and value.bit_length() > 3 * limit:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def section_from_dict(cls: type, data: dict[str, Any], *, prefix: str, base: Any = None) -> Any:
    """Build section `cls` from `data` on top of `base` (or the defaults), strictly."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix}: expected a mapping of keys, got {type(data).__name__}")
    hints = _hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in allowed:
            raise UserError(f"unknown config key '{prefix}.{key}'; allowed in '{prefix}': {', '.join(allowed)}")
        values[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    base = base if base is not None else cls()
    return dataclasses.replace(base, **values)


def cache_from_dict(data: Any, *, base: CacheConfig | None = None, prefix: str = "cache") -> CacheConfig:
    """The cache section: `kind` (default: the base's) picks the kind's config class, which takes
    only its own fields (and checks them). Fields given for the base's kind carry over when the
    kind stays; a new kind starts from its defaults (verify carries over). A bare kind name
    stands for {kind: name}. `prefix` names the section in messages (cache, cache_2)."""
    base = base if base is not None else CacheConfig()
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict):
        raise UserError(f"{prefix}: expected a mapping of keys, got {type(data).__name__}")
    kind = data.get("kind", base.kind)
    if not isinstance(kind, str) or kind not in registry.names():
        raise UserError(f"{prefix}.kind: expected one of {', '.join(registry.names())}, got {_short(kind)}")
    cls = registry.config_class(kind)
    hints = _hints(cls)
    allowed = registry.fields(kind)
    values = {}
    for key, value in data.items():
        if key == "kind":
            continue
        if key not in allowed:
            raise UserError(f"unknown config key '{prefix}.{key}' for cache kind {kind}; allowed in '{kind}': "
                            f"{', '.join(allowed)}")
        values[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    try:
        if kind == base.kind:
            return dataclasses.replace(base, **values)
        return cls(**{"verify": base.verify, **values})
    except ValueError as err:
        raise UserError(f"{prefix}.{err}") from None


def lora_from_text(text: str, *, key: str = "lora") -> LoraConfig:
    """"PATH[:SCALE]": a scale after the last colon when it reads as a number, else all is the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return LoraConfig(path=text)
        if _not_finite(scale):
            raise UserError(f"{key}.scale must be a finite number, got {_short(tail)}")
        return LoraConfig(path=path, scale=scale)
    if not text:
        raise UserError(f"{key}.path must name a file, got ''")
    return LoraConfig(path=text)


def loras_from_list(value: Any, *, prefix: str = "lora") -> tuple[LoraConfig, ...]:
    """The lora section: a list of mappings {path, scale, expert, sha256} or "PATH[:SCALE]"
    strings (null or [] for none)."""
    if value is None:
        return ()
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{prefix}: expected a list of {{path, scale, expert}} mappings or 'PATH[:SCALE]' strings, "
                        f"got {type(value).__name__}")
    loras = []
    for i, item in enumerate(value):
        key = f"{prefix}[{i}]"
        if isinstance(item, LoraConfig):
            loras.append(item)
        elif isinstance(item, str):
            loras.append(lora_from_text(item, key=key))
        elif isinstance(item, dict):
            if "path" not in item:
                raise UserError(f"{key}.path is required (the LoRA's .safetensors file)")
            loras.append(section_from_dict(LoraConfig, item, prefix=key, base=LoraConfig(path="")))
        else:
            raise UserError(f"{key}: expected a mapping {{path, scale, expert}} or 'PATH[:SCALE]', "
                            f"got {type(item).__name__}")
        if not loras[-1].path:
            raise UserError(f"{key}.path must name a file, got ''")
    return tuple(loras)


def config_from_dict(data: dict[str, Any] | None, *, base: RunConfig | None = None) -> RunConfig:
    """Merge a nested mapping (as read from YAML) onto `base`; unknown sections or keys fail."""
    base = base or RunConfig()
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name in data:
        if name not in SECTIONS:
            raise UserError(f"unknown config section '{name}'; allowed: {', '.join(SECTIONS)}")
    # cache before cache_2, whatever the order given: cache_2 starts from the cache it follows.
    for name, value in sorted(data.items(), key=lambda item: item[0] == "cache_2"):
        if name == "lora":
            sections[name] = loras_from_list(value)
        elif name == "cache":
            sections[name] = cache_from_dict(value or {}, base=base.cache)
        elif name == "cache_2":
            follows = sections.get("cache", base.cache)
            sections[name] = None if value is None else cache_from_dict(
                value, base=base.cache_2 if base.cache_2 is not None else follows, prefix="cache_2")
        else:
            sections[name] = section_from_dict(_section_class(name), value or {}, prefix=name,
                                               base=getattr(base, name))
    return dataclasses.replace(base, **sections)


def load_yaml(path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file is a folder: {path}")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                        f"a config is a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits; nesting past the stack
        raise UserError(f"{path}: not readable YAML ({str(err).splitlines()[0][:120]})") from None
    try:
        return config_from_dict(data, base=base)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings; values are parsed as YAML scalars (so 3, 3.5, true, null work)."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UserError(f"--set expects section.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of thousands of digits
            value = raw
        if isinstance(value, (dict, list)):
            value = raw  # a prompt such as "[a] b" stays text
        nested.setdefault(parts[0], {})[parts[1]] = value
    return config_from_dict(nested, base=config)


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain values, as YAML writes them (a tuple, such as MagCache's ratios, as a list)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
