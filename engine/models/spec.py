"""ModelSpec: what the engine knows about one diffusers model family, as data, and `Hooks`: the
loop's calls into the family, a small class whose defaults most families take.

A family folder (engine/models/wan/, engine/models/hunyuan_video/) fills one ModelSpec per
variant; the engine, the planner, the caches and parallel decode read only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unison.caching.base import CacheHints
from unison.parallel.sequence import TokenPlan
from unison.parallel.vae import VaeTiling

Component = tuple[str, str, dict]
"""(library, class name, config) of one pipeline component, as its config.json holds it."""


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
    image_resize: str = "stretch"
    """How the family's pipeline fits a picture to the video (sampling.image_resize auto)."""
    window_frames: int | None = None
    """Diffusion forcing: frames per window (sampling.window_frames)."""


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


@dataclass(frozen=True)
class Pick:
    """One published cache preset of a checkpoint, for the videos it applies to."""

    preset: str
    shorter_side_at_most: int | None = None
    """The video's shorter side is at most this many pixels (None: any size)."""
    image: bool | None = None
    """The run gives sampling.image (True), gives none (False), either (None)."""
    why: str = ""
    """What told this preset apart from the checkpoint's others (empty when it has one)."""

    def fits(self, sampling) -> bool:
        side = min(sampling.height, sampling.width)
        return ((self.shorter_side_at_most is None or side <= self.shorter_side_at_most)
                and (self.image is None or self.image == (sampling.image is not None)))


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A checkpoint its authors published in diffusers format: what `unison plan` builds on the
    meta device without a local copy, and what the cache presets were calibrated on."""

    name: str
    """Its name for `unison plan --family` (wan2.1-1.3b, ...)."""
    title: str
    """As its authors name it."""
    hub_ids: tuple[str, ...] = ()
    """Its Hugging Face Hub ids (a recipe's model.path may name one; without a local copy, plan
    takes the published configs)."""
    components: dict[str, Component]
    """The components' published config.json values (a value equal to diffusers' class default
    is left out)."""
    shape: tuple[tuple[str, object], ...]
    """(key, value) pairs of every expert's transformer/config.json that tell it apart (a key the
    file lacks reads as null)."""
    presets: dict[str, tuple[Pick, ...]] = field(default_factory=dict)
    """Per cache kind, its published presets in order; the first that fits the run is taken."""
    default: bool = False
    """The family's name alone names this checkpoint (one per family at most)."""
    suite_case: str | None = None
    """The GPU suite's case for its per-rank forwards (benchmarks/gpu_suite.py), if any: the case is
    named "<suite_case> <height>x<width>x<frames>", and launch/calibrate.py reads both parts."""

    def matches(self, configs: list[dict]) -> bool:
        return bool(configs) and all(config.get(key) == value for config in configs for key, value in self.shape)

    def shape_text(self) -> str:
        return ", ".join(f"{key} {'null' if value is None else value}" for key, value in self.shape)


@dataclass(frozen=True, kw_only=True)
class MetaTransformer:
    """What `unison plan` needs to build a family's transformer on the meta device from a config
    (published, or a folder's config.json) and to run it there."""

    default_heads: int = 40
    """num_attention_heads where the config leaves it out (diffusers' class default)."""
    one_block: dict = field(default_factory=lambda: {"num_layers": 1})
    """Config values that leave one block (the activation peak of one block is measured)."""
    single_blocks: Callable[[dict], int] = lambda config: 0
    """(config) -> its single-stream blocks (the rest are dual-stream or plain): what TaylorSeer's
    full form predicts differs between them."""
    inputs: Callable[..., dict] | None = None
    """(config, hidden_states, text_tokens, dtype) -> the forward's keyword arguments, empty, on the
    hidden states' device (the planner's meta device; the GPU suite fills them on a GPU); None: a
    cross-attention transformer's (hidden states, timestep, text, and any CLIP image tokens), which
    engine/planner/model.py forward_inputs builds."""
    forward: Callable | None = None
    """A stand-in for the transformer's forward, bound to it on the meta device, where the forward
    itself reads data (the same modules on the same shapes); None: the forward runs there."""
    joint_text: Callable[[int], int] = lambda text_tokens: text_tokens
    """(max_sequence_length) -> the text tokens a joint-attention block carries beside the video
    (other text streams, image tokens)."""


class Hooks:
    """The denoising loop's calls into a family, with the defaults a plain text-to-video family
    takes. A family subclasses it (image-to-video variants subclass their text-to-video hooks);
    the loop has no per-family branch."""

    takes_image = False
    """Whether it takes sampling.image (a first frame)."""
    takes_last = False
    """Whether it takes sampling.last_image (first-last-frame, where the checkpoint allows)."""

    def check_sampling(self, sampling) -> None:
        """Raise UserError for sampling settings the family cannot take (beyond size and frames)."""

    def layout_problem(self, sampling, parallel) -> str | None:
        """A parallel layout these sampling settings cannot run under, as one line (None: any the
        spec allows)."""
        return None

    def default_size(self, sampling, read) -> tuple[int, int] | None:
        """(height, width) of the video when the user gave neither, where the family's pipeline
        derives them (from the picture and the folder's configs, `read` as Limits reads them);
        None: the family's SamplingDefaults."""
        return None

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        """The prompts (and any picture) encoded: the transformer's inputs per guidance branch."""
        raise NotImplementedError

    def set_timesteps(self, pipe, steps: int, device: torch.device, sigmas=None) -> torch.Tensor:
        """The timesteps, leaving the scheduler ready to step; `sigmas` (sampling.sigmas) replace
        the scheduler's own spacing of `steps`."""
        if sigmas is not None:
            pipe.scheduler.set_timesteps(sigmas=list(sigmas), device=device)
        else:
            pipe.scheduler.set_timesteps(steps, device=device)
        pipe.scheduler.set_begin_index(0)
        return pipe.scheduler.timesteps

    def expert_boundary(self, pipe) -> float | None:
        """The timestep at and above which experts[0] runs; None for one expert."""
        return None

    def initial_latents(self, pipe, sampling, device: torch.device, generator: torch.Generator, *,
                        denoiser) -> torch.Tensor:
        """The initial noise from a CPU `generator` (default: the pipeline's prepare_latents at the
        first expert's input channels)."""
        return pipe.prepare_latents(1, denoiser.config.in_channels, sampling.height, sampling.width,
                                    sampling.frames, torch.float32, device, generator)

    def prepare_latents(self, pipe, noise: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The latents the first step starts from (default: the noise)."""
        return noise

    def model_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's hidden_states at a step (default: the latents)."""
        return latents

    def timestep_input(self, pipe, t: torch.Tensor, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's `timestep` argument."""
        return t.expand(latents.shape[0])

    def scheduler_step(self, pipe, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                       conditioning: Conditioning) -> torch.Tensor:
        """The next latents (default: the scheduler steps all of them)."""
        return pipe.scheduler.step(noise, t, latents, return_dict=False)[0]

    def finish(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The final latents after the last step (default: as they are)."""
        return latents

    def decode_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> tuple[torch.Tensor, int] | None:
        """What the video decodes from when it is not the final latents, and the leading pixel
        frames to drop from it (default None: the final latents, none dropped)."""
        return None

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The decoded video (B, C, F, H, W) in [-1, 1]; `vae` is the pipeline's VAE or the
        parallel decode standing in for it."""
        raise NotImplementedError

    def condition_frames(self, sampling) -> int:
        """Pixel frames VAE-encoded to condition the video (0 without a picture), for the planner."""
        return 0

    def branches(self, sampling) -> int:
        """Guidance branches per step: 2 with classifier-free guidance (scale > 1), else 1."""
        return 2 if sampling.guidance > 1 else 1


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
    hooks: Hooks
    """The loop's calls into the family."""
    tiny_heads: int = 4
    """Attention heads of the tiny preset's transformers (checked against the Ulysses degree
    before anything is built; a test checks it against the built model)."""
    attention_modules: Callable[[Any], dict[str, list[torch.nn.Module]]] | None = None
    """(transformer) -> {"self": [...], "cross": [...]}: the attention modules Pyramid Attention
    Broadcast reuses (joint video+text attention counts as self)."""
    cache_hints: CacheHints = field(default_factory=CacheHints)
    """What the caches need to know of its blocks (caching/base.py): TeaCache's indicator,
    TaylorSeer's modules."""
    meta: MetaTransformer = field(default_factory=MetaTransformer)
    """How `unison plan` builds and runs its transformer on the meta device."""
    block_count: Callable[[dict], int] = lambda config: 0
    """(a transformer's config.json as a dict) -> its blocks, all block lists together (PipeFusion
    needs one per stage: checked at plan time)."""
    token_plan: TokenPlan | None = None
    """Where the sequence is split and gathered, as data, and the parallel attention processors
    (parallel/sequence.py; None: no sequence, patch or PipeFusion parallelism)."""
    joint_text: bool = False
    """Self-attention is joint video + text attention with padded text masked (HunyuanVideo)."""
    needs_image: bool = False
    """Image-to-video only: a render needs sampling.image (`unison plan` plans with a stand-in)."""
    vae_tiling: VaeTiling | None = None
    """How its VAE's tiled decode is cut and blended (parallel/vae.py), so that the tiles can be
    spread over the ranks; None: no parallel decode (checked at plan time against
    output.parallel_decode)."""
    per_token_timesteps: bool = False
    """The transformer takes one timestep per token (Wan 2.2 TI2V-5B), for the planner's meta forward."""
    checkpoints: tuple[Checkpoint, ...] = ()
    """Its published checkpoints (for `unison plan` and the cache presets)."""
    displaced_patches: bool = False
    """Whether the plan's self-attention supports displaced patch parallelism (shard.displaced)."""
    limits: Callable[[Callable[[str], dict]], Limits] | None = None
    """(read) -> the model's Limits, where read("transformer/config.json") gives that file of
    the folder as a dict ({} when absent); for the tiny preset, its entry of `tiny_configs`."""
    tiny_configs: dict[str, dict] = field(default_factory=dict)
    """What a saved tiny preset's config files hold, for the keys `limits` reads (a test checks
    them against the built model, as it checks tiny_heads)."""
    forcing: bool = False
    """Diffusion forcing: rendered window by window with a timestep per frame (engine/windows.py);
    its hooks add first_prefix, set_block, latent_shape and base_is_window."""

    @property
    def two_experts(self) -> bool:
        return len(self.experts) > 1

    @property
    def pipefusion(self) -> bool:
        """Whether its blocks can be split into PipeFusion stages."""
        return self.token_plan is not None and self.token_plan.staged is not None

    @property
    def parallel_vae(self) -> bool:
        return self.vae_tiling is not None
