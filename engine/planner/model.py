"""A model at real size, for `unison plan`: its components' configs (published, or read from a
diffusers folder), and what the planner needs counted from them on the meta device: parameters,
FLOPs per forward, activation peaks, the VAE decode peak (meta.py does the counting).

Published configs are the config.json files of the diffusers-format checkpoints on the Hugging
Face Hub, listed by each family (engine/models/<family>/, `Checkpoint.components`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unison.engine.planner import meta as meta_model
from unison.engine.models import ModelSpec, checkpoints, read_json
from unison.engine.models.spec import Component
from unison.engine.errors import UserError

def published(name: str) -> tuple[ModelSpec, dict[str, Component]]:
    """A published checkpoint by its name, or by its family's name where the family names one
    (engine/models/<family>/: each family lists its checkpoints)."""
    key = published_name(name)
    known = checkpoints()
    if key not in known:
        sizes = [c.name for spec, c in known.values() if spec.family == name]
        raise UserError(f"unknown model '{name}' for --family; known: {', '.join(known)}"
                        + (f" ('{name}' is {len(sizes)} checkpoints: name one of {', '.join(sizes)})"
                           if len(sizes) > 1 else ""))
    spec, checkpoint = known[key]
    return spec, checkpoint.components


def published_name(name: str) -> str:
    """The checkpoint a family's name stands for (its `default` checkpoint), else `name` itself."""
    for spec, checkpoint in checkpoints().values():
        if checkpoint.default and spec.family == name:
            return checkpoint.name
    return name


def from_folder(path: str, spec: ModelSpec, index: dict) -> dict[str, Component]:
    """The components a diffusers folder names, with their config.json (no weights read)."""
    parts = {}
    for name in (*spec.experts, *spec.text_encoders, "vae"):
        entry = index.get(name)
        if not (isinstance(entry, list) and entry[0]):
            continue
        config = read_json(Path(path) / name / "config.json")
        if not isinstance(config, dict):
            raise UserError(f"{path}/{name}/config.json: expected a JSON object")
        parts[name] = (entry[0], entry[1], config)
    return parts


def from_pipeline(pipe, spec: ModelSpec) -> dict[str, Component]:
    """The components of a pipeline built in-process (the tiny presets), with their configs."""
    parts = {}
    for name in (*spec.experts, *spec.text_encoders, "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        library = type(module).__module__.split(".")[0]
        config = dict(module.config) if library == "diffusers" else module.config.to_dict()
        parts[name] = (library, type(module).__name__, config)
    return parts


@dataclass
class RealModel:
    """The counted facts of one model at one video size, cached per shape."""

    spec: ModelSpec
    parts: dict[str, Component]
    latent: tuple[int, int, int, int]
    """(channels, frames, height, width) of the latent video."""
    text_tokens: int
    cache: meta_model.CountCache = field(default_factory=lambda: meta_model.CountCache(None))
    name: str = ""
    """The published model's name, or the folder."""
    dtype: torch.dtype = torch.bfloat16
    """Of the transformer's weights and activations (bf16 on a GPU; float32 to compare with the CPU)."""

    @property
    def expert(self) -> dict[str, Any]:
        return self.parts[self.spec.experts[0]][2]

    def _module(self, name: str, **override) -> torch.nn.Module:
        library, class_name, config = self.parts[name]
        with meta_model.quiet_diffusers():
            module = meta_model.build(library, class_name, {**config, **override}).to(self.dtype)
        if name in self.spec.experts and self.spec.meta.forward is not None:
            module.forward = types.MethodType(self.spec.meta.forward, module)
        return module

    @property
    def patch(self) -> tuple[int, int, int]:
        return patch_size(self.expert)

    @property
    def video_tokens(self) -> int:
        _, f, h, w = self.latent
        pt, ph, pw = self.patch
        return (f // pt) * (h // ph) * (w // pw)

    @property
    def heads(self) -> int:
        return int(self.expert.get("num_attention_heads", self.spec.meta.default_heads))

    @property
    def head_dim(self) -> int:
        return int(self.expert.get("attention_head_dim", 128))

    @property
    def attentions(self) -> int:
        """Sequence-parallel attentions per forward: one per block, every block list counted."""
        return self.spec.block_count(self.expert)

    def parameters(self, name: str) -> dict[str, int]:
        key = self.cache.key("params", self.parts[name])
        blocks = self.spec.block_lists if name in self.spec.experts else ()
        return self.cache.get(key, lambda: meta_model.parameters(self._module(name), blocks))

    def _inputs(self, latent: tuple[int, int, int, int]) -> dict[str, Any]:
        c = self.expert
        x = torch.empty(1, c.get("in_channels", 16), *latent[1:], device=meta_model.META, dtype=self.dtype)
        return forward_inputs(self.spec, c, x, self.text_tokens, self.dtype, image_tokens=self.image_tokens)

    @property
    def image_tokens(self) -> int:
        """Wan 2.1 I2V's CLIP tokens: a picture's patches and class token (two pictures' for a
        first-last-frame checkpoint, its pos_embed_seq_len)."""
        if self.expert.get("pos_embed_seq_len"):
            return int(self.expert["pos_embed_seq_len"])
        vision = self.parts.get("image_encoder", ("", "", {}))[2]
        vision = vision.get("vision_config", vision)
        return (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 14))) ** 2 + 1

    def _one_row(self) -> tuple[int, int, int, int]:
        """The smallest latent of the same width: one frame, one row of patches."""
        c, _, _, w = self.latent
        pt, ph, _ = self.patch
        return (c, pt, ph, w)

    def flops(self, latent: tuple[int, int, int, int] | None = None) -> meta_model.FlopCount:
        """FLOPs of one forward of the (first) expert at `latent` (default: the whole video)."""
        latent = latent or self.latent
        key = self.cache.key("flops", self.parts[self.spec.experts[0]], latent, self.text_tokens)

        def count() -> dict:
            module = self._module(self.spec.experts[0])
            return meta_model.flop_dict(meta_model.count_flops(module, self._inputs(latent),
                                                               block_lists=self.spec.block_lists))

        return meta_model.FlopCount(**self.cache.get(key, count))

    def flops_at(self, tokens: int) -> meta_model.FlopCount:
        """One forward's projections and MLPs at `tokens` video tokens (a rank's shard), and the
        whole video's attention. Projections and MLPs are linear in the tokens plus a part that
        does not depend on them (text, timestep): both are read off two counted forwards, the
        whole video and one row of patches, and evaluated at `tokens`."""
        whole, row = self.flops(), self.flops(self._one_row())
        row_tokens = self._one_row()[3] // self.patch[2]

        def at(a: int, b: int) -> int:
            return round(b + (a - b) * (tokens - row_tokens) / (self.video_tokens - row_tokens))

        return meta_model.FlopCount(linear=at(whole.linear, row.linear), attention=whole.attention,
                                    other=at(whole.other, row.other), blocks=whole.blocks)

    def activation_peak(self, tokens: int) -> int:
        """Peak bytes of one forward's activations with `tokens` video tokens on this rank, from
        a one-block copy of the expert run on meta tensors (activations do not accumulate
        across blocks without autograd; weights are not counted here)."""
        c, _, h, w = self.latent
        pt, ph, pw = self.patch
        # Whole rows of patches, spread over as many frames as keep each frame within the
        # video's height (the position tables end there): at most one row per frame too many.
        rows = ceil_div(tokens, w // pw)
        frames = ceil_div(rows, h // ph)
        latent = (c, frames * pt, ph * ceil_div(rows, frames), w)
        key = self.cache.key("activations", self.parts[self.spec.experts[0]], latent, self.text_tokens, str(self.dtype))
        one_block = self.spec.meta.one_block

        def trace() -> dict:
            module = self._module(self.spec.experts[0], **one_block)
            kwargs = self._inputs(latent)
            return {"bytes": meta_model.peak_bytes(lambda: module(**kwargs))}

        return self.cache.get(key, trace)["bytes"]

    def vae_decode_peak(self, *, tiled: bool) -> int:
        """Peak bytes of decoding this video's latents in float32: whole, or (tiled) one 256-pixel
        tile at every frame plus the decoded tiles and the blended video (both whole-video size)."""
        z, f, h, w = self.latent
        tile = 256 // self.spec.size_multiple * self.patch[1]  # latent pixels of a 256-pixel tile
        latent = (1, z, f, min(h, tile), min(w, tile)) if tiled else (1, z, f, h, w)
        peak = self._vae_peak("vae", "decode", latent)
        if tiled:
            scale = self.spec.size_multiple // self.patch[1]
            frames = (f - 1) * self.spec.temporal_factor + 1
            peak += 2 * 3 * frames * h * scale * w * scale * 4
        return peak

    def vae_encode_peak(self, frames: int) -> int:
        """Peak bytes of encoding `frames` pixel frames at the video's size in float32, whole (the
        engine encodes image-to-video's condition untiled, as diffusers does)."""
        _, _, h, w = self.latent
        scale = self.spec.size_multiple // self.patch[1]
        return self._vae_peak("vae-encode", "encode", (1, 3, frames, h * scale, w * scale))

    def _vae_peak(self, name: str, method: str, shape: tuple[int, ...]) -> int:
        """Peak bytes of the VAE's `method` ("decode", "encode") on a float32 input of `shape`,
        traced on the meta device and kept in the count cache under `name`."""
        library, class_name, config = self.parts["vae"]

        def trace() -> dict:
            with meta_model.quiet_diffusers():
                vae = meta_model.build(library, class_name, config)
            x = torch.empty(shape, device=meta_model.META)
            return {"bytes": meta_model.peak_bytes(lambda: getattr(vae, method)(x, return_dict=False))}

        return self.cache.get(self.cache.key(name, self.parts["vae"], shape), trace)["bytes"]


def patch_size(config: dict[str, Any]) -> tuple[int, int, int]:
    """(frames, height, width) of a transformer's patches, from its config."""
    p = config.get("patch_size", 2)
    if isinstance(p, (list, tuple)):
        return tuple(p)
    return (config.get("patch_size_t", 1), p, p)


def forward_inputs(spec: ModelSpec, config: dict[str, Any], hidden_states: torch.Tensor, text_tokens: int,
                   dtype: torch.dtype, *, image_tokens: int | None = None) -> dict[str, Any]:
    """A transformer forward's keyword arguments around `hidden_states`, as empty tensors on its
    device (the planner's on the meta device; benchmarks/gpu_suite.py fills them on a GPU): the
    family's own (`spec.meta.inputs`), else a cross-attention transformer's: the timestep (one per
    token where `spec.per_token_timesteps`), `text_tokens` of text, and `image_tokens` CLIP image
    tokens where the config has an image_dim."""
    if spec.meta.inputs is not None:
        return spec.meta.inputs(config, hidden_states, text_tokens, dtype)
    device = hidden_states.device
    pt, ph, pw = patch_size(config)
    _, _, f, h, w = hidden_states.shape
    # TI2V-5B takes one timestep per token (expand_timesteps); the others one per video.
    timestep = torch.empty(1, (f // pt) * (h // ph) * (w // pw), device=device) if spec.per_token_timesteps else \
        torch.empty(1, device=device)
    inputs = dict(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=torch.empty(
        1, text_tokens, config.get("text_dim", 4096), device=device, dtype=dtype), return_dict=False)
    if config.get("image_dim") is not None:  # Wan 2.1 I2V: the CLIP tokens beside the text
        if image_tokens is None:
            raise ValueError("this transformer takes CLIP image tokens beside the text (its config has an "
                             "image_dim): say how many with image_tokens")
        inputs["encoder_hidden_states_image"] = torch.empty(1, image_tokens, config["image_dim"], device=device,
                                                            dtype=dtype)
    return inputs


def latent_shape(spec: ModelSpec, parts: dict[str, Component], *, height: int, width: int,
                 frames: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the latents the pipeline prepares."""
    vae = parts["vae"][2]
    spatial = int(vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio") or 8)
    temporal = spec.temporal_factor
    channels = int(vae.get("z_dim") or vae.get("latent_channels") or 16)
    return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def gib(n: float) -> float:
    return n / 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["RealModel", "published", "published_name", "from_folder", "forward_inputs", "patch_size",
           "latent_shape", "gib", "ceil_div"]
