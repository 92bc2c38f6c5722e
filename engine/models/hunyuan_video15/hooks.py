"""HunyuanVideo 1.5 text-to-video's loop hooks (diffusers' HunyuanVideo15Pipeline): two text
encoders (Qwen2.5-VL for the prompt, a ByT5 encoder for the quoted glyph text), classifier-free
guidance through the pipeline's guider (the same combination as ours: uncond + scale x (cond -
uncond), refused where the folder's guider asks for more), latents in the transformer's dtype with
an empty condition and mask beside them, and zero image embeddings for text-to-video."""

from __future__ import annotations

import math

import torch

from unison.engine import images
from unison.engine.errors import UserError
from unison.engine.models.hunyuan_video.t2v import HunyuanHooks
from unison.engine.models.spec import Conditioning, Limits


class HunyuanVideo15Hooks(HunyuanHooks):
    """Sigmas, timesteps in the latents' dtype and the scheduler as HunyuanVideo's; the rest its own."""

    family = "hunyuanvideo1.5"

    def check_sampling(self, sampling) -> None:
        images.check_images(sampling, family=self.family, takes_image=self.takes_image, needs_image=self.takes_image,
                            takes_last=False)
        from unison.engine import schedulers

        schedulers.check(sampling.scheduler, sampling.flow_shift, family=self.family, sigmas=True)
        if sampling.true_cfg_scale is not None:
            raise UserError(f"sampling.true_cfg_scale is HunyuanVideo's; {self.family} runs classifier-free "
                            "guidance with --guidance (on unless it is 1)")
        if sampling.guidance_2 is not None:
            raise UserError(f"--guidance-2 is the low-noise expert's guidance of Wan 2.2 A14B; {self.family} has "
                            "one transformer, so use --guidance alone")
        for name in ("prompt", "negative_prompt"):
            check_glyph_text(getattr(sampling, name), f"sampling.{name}")

    def branches(self, sampling) -> int:
        """The guider's rule: guidance is on unless its scale is 1."""
        return 1 if math.isclose(sampling.guidance, 1.0) else 2

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        guider = pipe.guider
        if guider.guidance_rescale > 0 or guider.use_original_formulation or (guider._start, guider._stop) != (0.0, 1.0):
            raise UserError("this folder's guider rescales, uses the original formulation or limits guidance to some "
                            "steps; unison runs plain classifier-free guidance")
        dtype = pipe.transformer.dtype
        # The pipeline pads the Qwen prompt to this attribute (1000 by default), which
        # max_sequence_length sets: padding is masked out of every attention, so it changes only
        # how many padded tokens the text stream carries.
        pipe.tokenizer_max_length = sampling.max_sequence_length

        def branch(prompt) -> dict[str, torch.Tensor]:
            embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt=prompt, device=device, dtype=dtype,
                                                                batch_size=1, num_videos_per_prompt=1)
            image = torch.zeros(1, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, dtype=dtype, device=device)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "encoder_hidden_states_2": embeds_2, "encoder_attention_mask_2": mask_2, "image_embeds": image}

        two = self.branches(sampling) == 2
        return Conditioning(cond=branch(sampling.prompt), uncond=branch(sampling.negative_prompt) if two else None,
                            scales=(sampling.guidance,))

    def initial_latents(self, pipe, sampling, device: torch.device, generator: torch.Generator, *,
                        denoiser) -> torch.Tensor:
        """In the transformer's dtype, as the pipeline makes them."""
        return pipe.prepare_latents(1, pipe.num_channels_latents, sampling.height, sampling.width, sampling.frames,
                                    pipe.transformer.dtype, device, generator)

    def prepare_latents(self, pipe, noise: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        latents, mask = pipe.prepare_cond_latents_and_mask(noise, pipe.transformer.dtype, noise.device)
        conditioning.video = {"latents": latents, "mask": mask}
        return noise

    def model_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return torch.cat([latents, conditioning.video["latents"], conditioning.video["mask"]], dim=1)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def condition_frames(self, sampling) -> int:
        return 0


VISION_TOKENS = 729
"""Image tokens beside the text: SigLIP's 27 x 27 patches (the pipeline's vision_num_semantic_tokens;
all zeros, and masked out, for text-to-video)."""

GLYPH_TOKENS = 256
"""ByT5 tokens of the quoted text (the pipeline's tokenizer_2_max_length): one per UTF-8 byte of
the glyph sentence it builds from the quotes, and the end token."""


def check_glyph_text(prompt: str | None, name: str) -> None:
    """The pipeline cuts the glyph sentence at GLYPH_TOKENS without a word: refuse it instead."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    glyph = extract_glyph_texts(prompt or "")
    if glyph is not None and len(glyph.encode("utf-8")) + 1 > GLYPH_TOKENS:
        raise UserError(f"{name}: the quoted text makes {len(glyph.encode('utf-8')) + 1} ByT5 tokens (one per "
                        f"byte of '{glyph[:40]}...', and the end); HunyuanVideo 1.5's glyph encoder takes "
                        f"at most {GLYPH_TOKENS}")


TEXT_TOKENS = 1000
"""Qwen tokens past the chat template's system prompt that the pipeline pads every prompt to
(its tokenizer_max_length): the length HunyuanVideo 1.5 was trained with."""


def limits(read) -> Limits:
    """The Qwen prompt is padded to max_sequence_length, at most the trained length; no video
    limit (the rotary tables are computed for any grid)."""
    return Limits(text_tokens=TEXT_TOKENS, text_source="the text length HunyuanVideo 1.5 was trained with")
