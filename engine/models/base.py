"""ModelSpec: what the engine needs to know about one diffusers model family, as data.

A family module (wan.py, hunyuan_video.py) fills one ModelSpec per family with small
functions over the family's diffusers pipeline. The engine's loop calls only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingDefaults:
    """Family defaults for sampling fields the user left unset."""

    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    max_sequence_length: int
    guidance_2: float | None = None
    true_cfg_scale: float | None = None


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The largest video and text a model takes, read from its config files (never its weights)
    so that a plan refuses what would only fail after loading. None: no limit of that kind."""

    frames: int | None = None
    height: int | None = None
    width: int | None = None
    video_source: str = ""
    """Where the video limits come from (for the error message)."""
    text_tokens: int | None = None
    """Most text tokens (sampling.max_sequence_length)."""
    text_source: str = ""
    last_frame: bool = True
    """Whether the model takes a last frame (sampling.last_image) besides the first."""
    last_frame_source: str = ""
    """Why not (for the error message)."""


@dataclass
class Conditioning:
    """Transformer keyword arguments per guidance branch, the guidance scale per expert, and what
    conditions the video itself (image-to-video: the encoded frames and their mask), which the
    family's `model_input`, `timestep_input` and `finish` read."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    scales: tuple[float, ...]
    video: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    family: str
    """Name used in configs and by `make-tiny --family`."""
    title: str
    """Human name, for logs and the README."""
    pipeline_class: str
    """diffusers pipeline class name (model_index.json's `_class_name`)."""
    transformer_class: str
    """diffusers transformer class name."""
    experts: tuple[str, ...]
    """Pipeline attributes of the denoisers, in order of use (high noise first)."""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """Pipeline attributes of the text encoders (for the plan's per-component dtype and device)."""
    fps: int
    """Frame rate of the written video."""
    size_multiple: int
    """Height and width must be multiples of this (VAE spatial factor × patch size)."""
    temporal_factor: int
    """Frames must be temporal_factor·k + 1."""
    embedded_guidance: bool
    """The transformer takes guidance as an input (distilled guidance) rather than two branches."""
    block_lists: tuple[str, ...]
    """Transformer attributes holding the block ModuleLists, in execution order."""
    defaults: SamplingDefaults
    """Defaults for real checkpoints."""
    tiny_defaults: SamplingDefaults
    """Defaults for the tiny random-weight preset."""
    matches: Callable[[dict[str, Any]], bool]
    """Does a model_index.json mapping belong to this family?"""
    build_tiny: Callable[[int], Any]
    """Build the tiny random-weight pipeline from a seed (in-process, offline)."""
    check_sampling: Callable[[Any], None]
    """Raise UserError for sampling settings the family cannot take (beyond size/frames)."""
    encode: Callable[[Any, Any, torch.device], Conditioning]
    """(pipe, resolved sampling, device) -> Conditioning."""
    set_timesteps: Callable[[Any, int, torch.device], torch.Tensor]
    """(pipe, steps, device) -> timesteps, leaving the scheduler ready to step."""
    timestep_input: Callable[[Any, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    """(pipe, t, latents, conditioning) -> the `timestep` argument of the transformer."""
    expert_boundary: Callable[[Any], float | None]
    """(pipe) -> timestep at and above which experts[0] runs; None for one expert."""
    decode: Callable[[Any, torch.Tensor], torch.Tensor]
    """(pipe, latents) -> decoded video tensor (B, C, F, H, W) in [-1, 1]."""
    initial_latents: Callable[[Any, Any, torch.device, torch.Generator], torch.Tensor] | None = None
    """(pipe, sampling, device, CPU generator) -> the initial noise (None: the pipeline's
    prepare_latents at the first expert's input channels)."""
    prepare_latents: Callable[[Any, torch.Tensor, Conditioning], torch.Tensor] | None = None
    """(pipe, initial noise, conditioning) -> the latents the first step starts from (None: the
    noise; HunyuanVideo I2V: with a trace of the picture)."""
    model_input: Callable[[Any, torch.Tensor, Conditioning], torch.Tensor] | None = None
    """(pipe, latents, conditioning) -> the transformer's hidden_states at a step (None: the
    latents; image-to-video: with the encoded image joined or put in place)."""
    scheduler_step: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor] | None = None
    """(pipe, noise prediction, t, latents, conditioning) -> the next latents (None:
    pipe.scheduler.step over all of them; HunyuanVideo I2V token_replace: frames 1: only)."""
    finish: Callable[[Any, torch.Tensor, Conditioning], torch.Tensor] | None = None
    """(pipe, latents, conditioning) -> the final latents after the last step (None: as they are)."""
    decode_input: Callable[[Any, torch.Tensor, Conditioning], tuple[torch.Tensor, int]] | None = None
    """(pipe, latents after the last step, conditioning) -> the latents the video decodes from and
    the leading pixel frames to drop from it (None: the final latents, none dropped; HunyuanVideo
    I2V latent_concat: every latent frame, the picture's 4 pixel frames dropped, as diffusers)."""
    tiny_heads: int = 4
    """Attention heads of the tiny preset's transformers (checked against the Ulysses degree
    before anything is built; a test checks it against the built model)."""
    attention_modules: Callable[[Any], dict[str, list[torch.nn.Module]]] | None = None
    """(transformer) -> {"self": [...], "cross": [...]}: the attention modules Pyramid Attention
    Broadcast reuses (joint video+text attention counts as self)."""
    sequence_parallel_plan: Callable[..., None] | None = None
    """Installs the split/gather hooks and parallel self-attention (None: not supported yet)."""
    joint_text: bool = False
    """Self-attention is joint video + text attention with padded text masked (HunyuanVideo)."""
    needs_image: bool = False
    """Image-to-video only: a render needs sampling.image (`unison plan` plans with a stand-in)."""
    parallel_vae: bool = False
    """Whether its VAE's tiled decode can be spread over the ranks (parallel/vae.py knows its VAE);
    checked at plan time against output.parallel_decode."""
    displaced_patches: bool = False
    """Whether the plan's self-attention supports displaced patch parallelism (shard.displaced)."""
    pipefusion_plan: Callable[..., Any] | None = None
    """(transformer, PipeStage) -> keeps the stage's blocks behind a StageRunner (None: no PipeFusion)."""
    limits: Callable[[Callable[[str], dict]], Limits] | None = None
    """(read) -> the model's Limits, where read("transformer/config.json") gives that file of
    the folder as a dict ({} when absent); for the tiny preset, its entry of `tiny_configs`."""
    tiny_configs: dict[str, dict] = field(default_factory=dict)
    """What a saved tiny preset's config files hold, for the keys `limits` reads (a test checks
    them against the built model, as it checks tiny_heads)."""
    notes: tuple[str, ...] = field(default=())
    """What is supported and what is not, for `--dry-run` and the README."""

    @property
    def two_experts(self) -> bool:
        return len(self.experts) > 1
