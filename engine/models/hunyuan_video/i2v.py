"""HunyuanVideo I2V (diffusers' HunyuanVideoImageToVideoPipeline): the first frame given as a
picture, in either of the two ways the transformer's `image_condition_type` names.

The picture enters twice, as diffusers does it:
- In the text: the LLaVA text encoder reads it with the prompt template (its image placeholder
  expanded to the vision tower's 576 tokens); the pipeline's own `encode_prompt` does this and
  keeps every `image_embed_interleave`-th image token before the prompt's (2 for latent_concat,
  4 for token_replace; the negative branch, encoded with a black picture, always 2).
- In the video: the picture's VAE latents (the distribution's mode, times the scaling factor).
  The initial noise carries a trace of them (noise x 0.999 + picture x 0.001 on every frame).
  `latent_concat` (HunyuanVideo-I2V-33ch): the picture's latents on the first latent frame (zeros
  after it) and a mask (1 on the first frame) join the noisy latents at every step (2C + 1
  channels in); the final latents leave out the first latent frame. `token_replace`
  (HunyuanVideo-I2V): the first latent frame is the picture's at every step; the transformer
  modulates its tokens with timestep 0 (token_replace_emb); the scheduler steps frames 1: only.
Every rank encodes the picture itself; under sequence parallelism the split plan tells each rank
how many of its tokens belong to the first frame (parallel.py).
"""

from __future__ import annotations

import torch

from unison.engine import images
from unison.engine.models.hunyuan_video.t2v import (HunyuanHooks, check_guidance, text_limits, tiny_llama_config,
                                                    tiny_text_encoder_2, tiny_vae)
from unison.engine.models.spec import Conditioning, Limits
from unison.engine.models.tiny import IMAGE_ID, PAD_ID, tiny_llava_tokenizer, tiny_tokenizer

CONDITION_TYPES = ("latent_concat", "token_replace")

TINY_IMAGE = 48
"""The tiny LLaVA vision tower's input size: 2-pixel patches, 24 x 24 = 576 image tokens, the
count the prompt template reserves (its image_emb_len)."""


def _tiny_llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TINY_IMAGE, patch_size=2, projection_dim=8)
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_index=IMAGE_ID,
                         pad_token_id=PAD_ID, image_seq_length=(TINY_IMAGE // 2) ** 2)
    return LlavaForConditionalGeneration(config)


def tiny_pipeline(seed: int, *, condition: str = "latent_concat"):
    """The tiny random-weight HunyuanVideo I2V pipeline (4 latent channels; latent_concat: 9 in)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    vae = tiny_vae()
    text_encoder = _tiny_llava()
    text_encoder_2 = tiny_text_encoder_2()
    torch.manual_seed(seed + 1)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=9 if condition == "latent_concat" else 4, out_channels=4, num_attention_heads=4,
        attention_head_dim=10, num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        image_condition_type=condition,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                   crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=text_encoder, tokenizer=tiny_llava_tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(bos=True, eos=True), image_processor=processor,
    )


def _condition(pipe) -> str:
    condition = pipe.transformer.config.image_condition_type
    if condition not in CONDITION_TYPES:
        raise ValueError(f"HunyuanVideo I2V: the transformer's image_condition_type is {condition!r}; "
                         f"expected one of {', '.join(CONDITION_TYPES)}")
    return condition


def _image_latents(pipe, sampling, picture, condition: str, device: torch.device) -> dict[str, torch.Tensor]:
    """{"image": the picture's latents (1 frame)} and, for latent_concat, {"concat": what joins the
    noisy latents: those latents on the first latent frame, zeros after, and the mask}."""
    vae = pipe.vae
    pixels = images.for_vae(pipe.video_processor, picture, height=sampling.height, width=sampling.width,
                            mode=sampling.image_resize)
    encoded = vae.encode(pixels.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()
    image = encoded.to(device, torch.float32) * vae.config.scaling_factor
    if condition == "token_replace":
        return {"image": image}
    frames = (sampling.frames - 1) // pipe.vae_scale_factor_temporal + 1
    concat = image.new_zeros(1, image.shape[1] + 1, frames, *image.shape[3:])
    concat[:, :-1, :1] = image
    concat[:, -1:, :1] = 1
    return {"image": image, "concat": concat}


class HunyuanImageHooks(HunyuanHooks):
    """HunyuanVideo image-to-video: the picture in LLaVA's prompt and in the latents, by
    `image_condition_type` (see the module docstring)."""

    family = "hunyuanvideo-i2v"
    takes_image = True

    def check_sampling(self, sampling) -> None:
        images.check_images(sampling, family=self.family, takes_image=True, needs_image=True, takes_last=False)
        check_guidance(sampling, family=self.family)

    def condition_frames(self, sampling) -> int:
        """The picture alone is VAE-encoded."""
        return 1

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        from PIL import Image

        dtype = pipe.transformer.dtype
        condition = _condition(pipe)
        picture = images.read(sampling.image)
        guidance = None
        if pipe.transformer.config.guidance_embeds:  # embedded guidance (x 1000) on both branches
            guidance = torch.tensor([sampling.guidance], dtype=dtype, device=device) * 1000.0

        def branch(prompt: str, shown, **interleave) -> dict[str, torch.Tensor]:
            embeds, pooled, mask = pipe.encode_prompt(image=shown, prompt=prompt, prompt_2=None, num_videos_per_prompt=1,
                                                      device=device, max_sequence_length=sampling.max_sequence_length,
                                                      **interleave)
            out = {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask.to(dtype),
                   "pooled_projections": pooled.to(dtype)}
            return out if guidance is None else {**out, "guidance": guidance}

        true_cfg = sampling.true_cfg_scale or 1.0
        do_true_cfg = self.branches(sampling) == 2
        cond = branch(sampling.prompt, picture, image_embed_interleave=2 if condition == "latent_concat" else 4)
        # The negative branch sees a black picture at the video's size, at the pipeline's default interleave.
        black = Image.new("RGB", (sampling.width, sampling.height), 0)
        uncond = branch(sampling.negative_prompt, black) if do_true_cfg else None
        conditioning = Conditioning(cond=cond, uncond=uncond, scales=(true_cfg,))
        conditioning.video = _image_latents(pipe, sampling, picture, condition, device)
        return conditioning

    def initial_latents(self, pipe, sampling, device: torch.device, generator: torch.Generator, *,
                        denoiser) -> torch.Tensor:
        config = pipe.transformer.config
        channels = (config.in_channels - 1) // 2 if _condition(pipe) == "latent_concat" else config.in_channels
        shape = (1, channels, (sampling.frames - 1) // pipe.vae_scale_factor_temporal + 1,
                 sampling.height // pipe.vae_scale_factor_spatial, sampling.width // pipe.vae_scale_factor_spatial)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def prepare_latents(self, pipe, noise: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """A trace of the picture on every frame (the picture's one frame broadcast over them)."""
        keep = torch.tensor([0.999], device=noise.device)
        return noise * keep + conditioning.video["image"] * (1 - keep)

    def model_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        video = conditioning.video
        if "concat" in video:
            return torch.cat([latents, video["concat"]], dim=1)
        return torch.cat([video["image"], latents[:, :, 1:]], dim=2)

    def scheduler_step(self, pipe, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                        conditioning: Conditioning) -> torch.Tensor:
        video = conditioning.video
        if "concat" in video:
            return pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        # token_replace: the first latent frame is the picture's and is never stepped.
        stepped = pipe.scheduler.step(noise[:, :, 1:], t, latents[:, :, 1:], return_dict=False)[0]
        return torch.cat([video["image"], stepped], dim=2)

    def finish(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        # latent_concat: the first latent frame stood for the picture and leaves the result (diffusers'
        # latent output).
        return latents[:, :, 1:] if "concat" in conditioning.video else latents

    def decode_input(self, pipe, latents: torch.Tensor, conditioning: Conditioning) -> tuple[torch.Tensor, int]:
        # latent_concat: the video decodes from every latent frame, the picture's included (the causal
        # VAE then sees it before the first frame), and drops its 4 pixel frames, as diffusers does.
        return (latents, 4) if "concat" in conditioning.video else (latents, 0)


TEMPLATE_TOKENS = 103 + 575
"""Llama positions the prompt template adds to max_sequence_length: 103 tokens before the prompt
(diffusers' DEFAULT_PROMPT_TEMPLATE crop_start) with the image placeholder expanded to 576."""


def limits(read) -> Limits:
    """No video limit (RoPE positions for any grid). The text goes through LLaVA's Llama with the
    template and the picture's tokens: max_sequence_length + TEMPLATE_TOKENS positions."""
    text = read("text_encoder/config.json").get("text_config")
    positions = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return text_limits(positions, TEMPLATE_TOKENS, "the LLaVA text model",
                       f"the {TEMPLATE_TOKENS} positions of the prompt template and the picture's tokens")
