"""Wan's loop hooks: Wan 2.1 T2V and I2V, Wan 2.2 A14B T2V and I2V (two experts) and Wan 2.2
TI2V-5B (text or image to video), served by diffusers' WanPipeline and WanImageToVideoPipeline.

The variants differ in the folder's model_index.json (the pipeline class, `transformer_2` +
`boundary_ratio` for A14B, `expand_timesteps` for TI2V-5B), their VAE and their defaults.
Image-to-video, as diffusers' WanImageToVideoPipeline does it:
- Wan 2.1 / 2.2 I2V (`WanImageHooks`): the picture (and the last frame's, first-last-frame)
  resized, followed by black frames, VAE-encoded (the distribution's mode) and normalised; a
  mask marks the given frames (one channel per frame of a latent frame's group of 4); mask and
  latents (4 + 16 channels) join the noisy latents at every step (the transformer takes 36
  channels). Wan 2.1's CLIP image tokens (the vision encoder's second-to-last hidden states) go
  to every block's cross-attention beside the text.
- TI2V-5B (`WanHooks` with a picture): the first latent frame is the encoded picture, not noise:
  the model input takes it there at every step, its tokens carry timestep 0, and the final
  latents keep it.
Every rank encodes the picture itself (one VAE encode before the loop: the 81-frame condition
video for I2V, one frame for TI2V-5B); the conditioning is whole on every rank like the latents,
and the transformer's split after patch embedding shards it with them.
"""

from __future__ import annotations

import torch

from unison.engine import images, schedulers
from unison.engine.errors import UserError
from unison.engine.models.spec import Conditioning, Hooks, Limits
from unison.engine.models.wan.vae import latent_stats

WAN_TEXT_TOKENS = 512
"""The text length Wan's transformers were trained with (umT5 text, padded to 512: Wan's
text_len, diffusers' WanPipeline default max_sequence_length)."""


def _image_tokens(pipe, pictures: list, device: torch.device) -> torch.Tensor:
    """The CLIP vision encoder's second-to-last hidden states (diffusers' encode_image)."""
    encoder = pipe.image_encoder
    pixels = pipe.image_processor(images=pictures, return_tensors="pt").to(encoder.device)
    return encoder(**pixels, output_hidden_states=True).hidden_states[-2].to(device)


def _image_condition(pipe, sampling, first, last, device: torch.device, *, ti2v: bool) -> dict[str, torch.Tensor]:
    """{"latents": the encoded frames, "mask": which are given} (see the module docstring)."""
    vae = pipe.vae
    size = dict(height=sampling.height, width=sampling.width, mode=sampling.image_resize)
    frames = [images.for_vae(pipe.video_processor, first, **size).to(device)]
    if not ti2v:
        blank = frames[0].new_zeros(1, 3, sampling.frames - (1 if last is None else 2), sampling.height,
                                    sampling.width)
        frames = [frames[0].unsqueeze(2), blank]
        if last is not None:
            frames.append(images.for_vae(pipe.video_processor, last, **size).to(device).unsqueeze(2))
        video = torch.cat(frames, dim=2)
    else:
        video = frames[0].unsqueeze(2)
    encoded = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().to(device, torch.float32)
    mean, inv_std = latent_stats(vae, device, torch.float32)
    encoded = (encoded - mean) * inv_std
    temporal = pipe.vae_scale_factor_temporal
    latent_frames = (sampling.frames - 1) // temporal + 1
    h, w = sampling.height // pipe.vae_scale_factor_spatial, sampling.width // pipe.vae_scale_factor_spatial
    if ti2v:  # 0 where the picture stands (the first latent frame), 1 where noise is denoised
        mask = torch.ones(1, 1, latent_frames, h, w, dtype=torch.float32, device=device)
        mask[:, :, 0] = 0
        return {"latents": encoded, "mask": mask}
    # One mask value per pixel frame, the first frame's repeated over its latent frame's group.
    given = torch.zeros(1, 1, sampling.frames, h, w, device=device)
    given[:, :, 0] = 1
    if last is not None:
        given[:, :, -1] = 1
    given = torch.cat([given[:, :, :1].repeat_interleave(temporal, dim=2), given[:, :, 1:]], dim=2)
    mask = given.view(1, latent_frames, temporal, h, w).transpose(1, 2)
    return {"latents": torch.cat([mask, encoded], dim=1)}


def _with_picture(video: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """TI2V-5B: the picture's latent frame where the mask is 0, the latents elsewhere."""
    return (1 - video["mask"]) * video["latents"] + video["mask"] * latents


class WanHooks(Hooks):
    """Wan 2.1 / 2.2 text-to-video, and TI2V-5B with or without a picture."""

    i2v = False

    def __init__(self, family: str, *, title: str = "Wan 2.1 I2V"):
        self.family, self.title = family, title
        self.takes_image = self.i2v or family == "wan2.2-ti2v"
        """A picture is taken (image-to-video, or TI2V-5B's optional one)."""
        self.takes_last = self.i2v
        self.clip_tokens = family == "wan-i2v"
        """CLIP image tokens join the text in cross-attention, which then needs the trained text length."""
        self.two_experts = family in ("wan2.2", "wan2.2-i2v")

    def check_sampling(self, sampling) -> None:
        family, i2v = self.family, self.i2v
        images.check_images(sampling, family=family, takes_image=self.takes_image, needs_image=i2v,
                            takes_last=self.takes_last)
        schedulers.check(sampling.scheduler, sampling.flow_shift, family=family, sigmas=False)
        if self.clip_tokens and sampling.max_sequence_length != WAN_TEXT_TOKENS:
            # diffusers' Wan attention tells the CLIP tokens from the text by counting 512 text
            # tokens from the end of the context: any other length mixes the two.
            raise UserError(f"sampling.max_sequence_length must be {WAN_TEXT_TOKENS} for {self.title} (its "
                            f"cross-attention takes the last {WAN_TEXT_TOKENS} context tokens as text), got "
                            f"{sampling.max_sequence_length}")
        if sampling.true_cfg_scale is not None:
            raise UserError(
                f"sampling.true_cfg_scale is HunyuanVideo's; {family} runs classifier-free guidance "
                "with --guidance (CFG is on when it is > 1)"
            )
        if sampling.guidance_2 is not None and not self.two_experts:
            raise UserError(
                f"--guidance-2 is the low-noise expert's guidance of Wan 2.2 A14B; {family} has one "
                "transformer, so use --guidance alone"
            )

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        do_cfg = self.branches(sampling) == 2
        cond, uncond = pipe.encode_prompt(
            prompt=sampling.prompt, negative_prompt=sampling.negative_prompt,
            do_classifier_free_guidance=do_cfg, num_videos_per_prompt=1,
            max_sequence_length=sampling.max_sequence_length, device=device,
        )
        model = pipe.transformer or pipe.transformer_2
        dtype = model.dtype
        scales = (sampling.guidance,)
        if self.boundary_ratio(pipe) is not None:
            scales += (sampling.guidance if sampling.guidance_2 is None else sampling.guidance_2,)
        conditioning = Conditioning(
            cond={"encoder_hidden_states": cond.to(dtype)},
            uncond={"encoder_hidden_states": uncond.to(dtype)} if do_cfg else None,
            scales=scales,
        )
        if sampling.image is not None:
            first = images.read(sampling.image)
            last = images.read(sampling.last_image, "sampling.last_image") if sampling.last_image is not None else None
            conditioning.video = _image_condition(pipe, sampling, first, last, device, ti2v=self.per_token(pipe))
            if model.config.image_dim is not None:  # Wan 2.1 I2V: CLIP tokens beside the text, both branches
                tokens = _image_tokens(pipe, [first] if last is None else [first, last], device).to(dtype)
                for branch in (conditioning.cond, conditioning.uncond):
                    if branch is not None:
                        branch["encoder_hidden_states_image"] = tokens
        return conditioning

    def initial_latents(self, pipe, sampling, device: torch.device, generator: torch.Generator, *,
                        denoiser) -> torch.Tensor:
        """The noise at the VAE's channels (the transformer takes more: the image's join them)."""
        vae = pipe.vae
        shape = (1, vae.config.z_dim, (sampling.frames - 1) // pipe.vae_scale_factor_temporal + 1,
                 sampling.height // pipe.vae_scale_factor_spatial, sampling.width // pipe.vae_scale_factor_spatial)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def model_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if not conditioning.video:
            return latents
        return _with_picture(conditioning.video, latents)  # TI2V-5B: the picture's latent frame in place of the noise

    def finish(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return _with_picture(conditioning.video, latents) if "mask" in conditioning.video else latents

    def timestep_input(self, pipe, t: torch.Tensor, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if self.per_token(pipe):
            # TI2V-5B: one timestep per latent token (all equal for text-to-video; 0 on the picture's
            # tokens for image-to-video), as diffusers builds it.
            mask = conditioning.video.get("mask")
            if mask is None:
                mask = torch.ones(latents.shape, dtype=torch.float32, device=latents.device)
            per_token = (mask[0][0][:, ::2, ::2] * t).flatten()
            return per_token.unsqueeze(0).expand(latents.shape[0], -1)
        return t.expand(latents.shape[0])

    def expert_boundary(self, pipe) -> float | None:
        ratio = self.boundary_ratio(pipe)
        return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    def boundary_ratio(self, pipe) -> float | None:
        """The folder's expert switch (Wan 2.2 A14B), as a share of the training timesteps."""
        return pipe.config.boundary_ratio

    def per_token(self, pipe) -> bool:
        """One timestep per token and a picture in place of the first latent frame (TI2V-5B)."""
        return bool(pipe.config.expand_timesteps)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.device, dtype=vae.dtype)
        # diffusers divides by the reciprocal of std; do the same so decoded frames match bit for bit.
        mean, inv_std = latent_stats(vae, latents.device, latents.dtype)
        return vae.decode(latents / inv_std + mean, return_dict=False)[0]

    def condition_frames(self, sampling) -> int:
        """TI2V-5B VAE-encodes the picture alone."""
        return 0 if sampling.image is None else 1


class WanImageHooks(WanHooks):
    """Wan 2.1 / 2.2 image-to-video: the picture's latents and mask join the noisy latents."""

    i2v = True

    def model_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return torch.cat([latents, conditioning.video["latents"]], dim=1)

    def condition_frames(self, sampling) -> int:
        """The whole condition video (the picture, black frames, any last frame) is VAE-encoded."""
        return sampling.frames


def limits(read) -> Limits:
    """Wan's RoPE table (diffusers' WanRotaryPosEmbed) holds rope_max_seq_len positions per latent
    axis and is sliced by the patches along frames, height and width: past it the slice comes up
    short and the forward fails. The text is umT5's, padded to max_sequence_length: the
    tokenizer's model_max_length where it names one, else Wan's 512."""
    vae = read("vae/config.json")
    spatial, temporal = int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))
    experts = [cfg for cfg in (read("transformer/config.json"), read("transformer_2/config.json")) if cfg]
    rope = min(int(cfg.get("rope_max_seq_len", 1024)) for cfg in experts) if experts else 1024
    pt, ph, pw = (int(p) for p in (experts[0] if experts else {}).get("patch_size", (1, 2, 2)))
    text = read("tokenizer/tokenizer_config.json").get("model_max_length")
    named = isinstance(text, int) and 0 < text <= 10**6  # transformers writes ~1e30 for "no limit"
    # Wan 2.1 I2V takes CLIP tokens of one picture, or of two (first-last-frame checkpoints, whose
    # image embedding has a position table of pos_embed_seq_len = 2 x 257 tokens); Wan 2.2 I2V none.
    clip_one = bool(experts) and experts[0].get("image_dim") is not None and experts[0].get("pos_embed_seq_len") is None
    # Latent frames (frames - 1) / temporal + 1, in patches of pt, at most rope of them.
    return Limits(
        frames=(rope * pt + pt - 2) * temporal + 1, height=rope * ph * spatial, width=rope * pw * spatial,
        video_source=f"the transformer's rope_max_seq_len, {rope} positions per axis; "
                     f"{ph * spatial} pixels and {pt * temporal} frames per position",
        text_tokens=text if named else WAN_TEXT_TOKENS,
        text_source="the tokenizer's model_max_length" if named else "the text length Wan was trained with",
        last_frame=not clip_one,
        last_frame_source="this Wan 2.1 I2V checkpoint takes one picture (its transformer has no pos_embed_seq_len); "
                          "a last frame needs a first-last-frame checkpoint (Wan2.1-FLF2V-14B-720P-Diffusers)",
    )


def attention_modules(transformer) -> dict[str, list[torch.nn.Module]]:
    return {"self": [b.attn1 for b in transformer.blocks], "cross": [b.attn2 for b in transformer.blocks]}
