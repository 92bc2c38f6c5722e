"""Plan-time range checks: values that pass the loaders' type checks but that torch or the model
cannot take (a seed past 64 bits, a size past the RoPE table, more text tokens than the text
encoder holds, NaN), refused before anything loads so that --dry-run catches them too. Limits
are read from the model's own config files (a tiny preset's from its spec), never its weights."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from unison.engine.config import ModelConfig, RunConfig, SamplingConfig
from unison.engine.models import ModelSpec, read_json
from unison.engine.models.spec import Limits
from unison.engine.errors import UserError

SEED_RANGE = (-2**63, 2**64 - 1)
"""What torch.Generator.manual_seed takes (a negative seed s draws as 2**64 + s)."""
TIMEOUT_RANGE_S = (10.0, 86400.0)
"""parallel.timeout_s bounds. The floor: every rank must reach the rendezvous (TCPStore, gloo or
NCCL set-up) and every collective within it; ranks started by torchrun, srun or Ray begin
seconds apart (Python and torch imports alone take 2-5 s on a cold node, a cross-node NCCL
communicator seconds more), so below 10 s a healthy start times out. The ceiling: a day, so a
stuck collective still ends (DESIGN invariant 5), and far inside what datetime.timedelta takes."""
MAX_VIDEO_TOKENS = 2**22
"""Video tokens per guidance branch, for every family (the only size limit of HunyuanVideo, whose
positions have no table): about 35 times HunyuanVideo's largest video (1280x720, 129 frames:
118,800 tokens). At the cap one 50-step render of HunyuanVideo's 60 blocks already needs ~6e20
FLOPs of attention alone, about a day on 8 H100s at full speed; past it a size is a typo, and the
noise, attention and VAE would fail allocating after the model has loaded."""


def check_finite(config: RunConfig) -> None:
    """No float field is NaN or infinite (the loaders refuse them; a config built in Python too)."""
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        if part is None:  # cache_2 unset
            continue
        parts = {f"{section.name}[{i}]": p for i, p in enumerate(part)} if isinstance(part, tuple) \
            else {section.name: part}  # lora: a list of entries
        for name, part in parts.items():
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(f"{name}.{f.name} must be a finite number, got {value}")


def check_seeds(s: SamplingConfig, m: ModelConfig) -> None:
    """Seeds torch.Generator.manual_seed takes (beyond them it fails after the model has loaded)."""
    low, high = SEED_RANGE
    if not low <= s.seed <= high:
        raise UserError(f"sampling.seed must be between -2**63 and 2**64-1 (what torch.Generator takes), "
                        f"got {s.seed}")
    # The tiny presets seed their parts with tiny_seed, tiny_seed + 1 and tiny_seed + 2.
    if m.path is None and not low <= m.tiny_seed <= high - 2:
        raise UserError(f"model.tiny_seed must be between -2**63 and 2**64-3 (the preset also seeds "
                        f"tiny_seed + 1 and + 2), got {m.tiny_seed}")


def config_reader(model: ModelConfig, spec: ModelSpec):
    """read("transformer/config.json") -> that file of the model folder as a dict ({} when
    absent); for the tiny preset, the spec's tiny_configs entry. Never reads weights."""
    def read(name: str) -> dict:
        if model.path is None:
            return dict(spec.tiny_configs.get(name, {}))
        path = Path(model.path) / name
        data = read_json(path) if path.is_file() else {}
        return data if isinstance(data, dict) else {}

    return read


def check_limits(s: SamplingConfig, spec: ModelSpec, model: ModelConfig, *, read=None) -> None:
    """Size, frames, text length and steps against the model's own limits, read from its config
    files (RoPE table, text encoder, scheduler), so that --dry-run refuses what would otherwise
    fail only after loading, or try to allocate tens of GB. `read` (default: the folder's or the
    tiny preset's files) gives the configs another way (`unison plan`'s published models)."""
    read = read or config_reader(model, spec)
    try:
        limits = spec.limits(read) if spec.limits is not None else Limits()
        train_steps = int(read("scheduler/scheduler_config.json").get("num_train_timesteps", 1000))
    except (TypeError, ValueError) as err:
        raise UserError(f"{model.path}: cannot read the model's limits from its config files ({err})") from None
    # A diffusion-forcing video passes through the model a window at a time.
    windowed = s.window_frames is not None
    frames = s.window_frames if windowed else s.frames
    for name in ("frames", "height", "width"):
        most, value = getattr(limits, name), frames if name == "frames" else getattr(s, name)
        if most is not None and value > most:
            field = "window_frames" if windowed and name == "frames" else name
            raise UserError(f"sampling.{field}={value} runs past the position table of {spec.title}: at most "
                            f"{most} ({limits.video_source})")
    if limits.text_tokens is not None and s.max_sequence_length > limits.text_tokens:
        raise UserError(f"sampling.max_sequence_length={s.max_sequence_length} is more text tokens than "
                        f"{spec.title} takes: at most {limits.text_tokens} ({limits.text_source})")
    if s.last_image is not None and not limits.last_frame:
        raise UserError(f"sampling.last_image: {limits.last_frame_source}")
    if s.steps > train_steps:
        raise UserError(f"sampling.steps={s.steps} is more than the scheduler's {train_steps} training "
                        f"timesteps (num_train_timesteps); more steps only repeat timesteps")
    # An upper bound (temporal patch 1) on the tokens of the video; size_multiple is the VAE's
    # spatial factor times the patch size.
    tokens = ((frames - 1) // spec.temporal_factor + 1) * (s.height // spec.size_multiple) * \
        (s.width // spec.size_multiple)
    if tokens > MAX_VIDEO_TOKENS:
        raise UserError(f"{s.width}x{s.height}, {s.frames} frames is {tokens:,} video tokens; at most "
                        f"{MAX_VIDEO_TOKENS:,} (2**22) are accepted: no render of that size could finish")
