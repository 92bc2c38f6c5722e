"""HunyuanVideo 1.5 image-to-video's loop hooks (diffusers' HunyuanVideo15ImageToVideoPipeline).

The picture enters twice, as the pipeline does it, both times resized to the video's size
(image_resize auto: the pipeline's crop):
- beside the text: SigLIP's image tokens (its processor resizes the picture to its input size) on
  both guidance branches, which the transformer treats as valid tokens;
- in the video: the picture's VAE latents (the distribution's mode, times the scaling factor) on
  the first latent frame, zeros after it, and a mask of ones on that frame, joined to the noisy
  latents at every step.
The size: where the user gives neither height nor width, the pipeline's own choice, the bucket of
the transformer's target_size nearest the picture's aspect ratio (its image processor's
calculate_default_height_width); any other multiple of 16 is taken too.
"""

from __future__ import annotations

import torch

from unison.engine import images
from unison.engine.errors import UserError
from unison.engine.models.hunyuan_video15.hooks import HunyuanVideo15Hooks, limits as t2v_limits
from unison.engine.models.spec import Conditioning, Limits


class HunyuanVideo15ImageHooks(HunyuanVideo15Hooks):
    """The text-to-video hooks with the picture's SigLIP tokens and latents (module docstring)."""

    family = "hunyuanvideo1.5-i2v"
    takes_image = True

    def default_size(self, sampling, read) -> tuple[int, int] | None:
        if sampling.image is None:
            return None  # check_sampling says a picture is needed
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        width, height = images.read(sampling.image).size
        spatial = int(read("vae/config.json").get("spatial_compression_ratio", 16))
        target = int(read("transformer/config.json").get("target_size", 640))
        return HunyuanVideo15ImageProcessor(vae_scale_factor=spatial).calculate_default_height_width(
            height=height, width=width, target_size=target)

    def condition_frames(self, sampling) -> int:
        """The picture alone is VAE-encoded."""
        return 1

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        conditioning = super().encode(pipe, sampling, device)
        picture = pipe.video_processor.resize(images.read(sampling.image), height=sampling.height, width=sampling.width,
                                              resize_mode=images.RESIZE_MODES[sampling.image_resize])
        dtype = pipe.transformer.dtype
        tokens = pipe.encode_image(image=picture, batch_size=1, device=device, dtype=dtype)
        for branch in (conditioning.cond, conditioning.uncond):
            if branch is not None:
                branch["image_embeds"] = tokens
        frames = (sampling.frames - 1) // pipe.vae_scale_factor_temporal + 1
        shape = (1, pipe.num_channels_latents, frames, sampling.height // pipe.vae_scale_factor_spatial,
                 sampling.width // pipe.vae_scale_factor_spatial)
        latents, mask = pipe.prepare_cond_latents_and_mask(
            latents=torch.empty(shape, device="meta"), image=picture, batch_size=1, height=sampling.height,
            width=sampling.width, dtype=dtype, device=device)
        conditioning.video = {"latents": latents, "mask": mask}
        return conditioning

    def prepare_latents(self, pipe, noise: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return noise  # the condition was made with the picture's encoding


def limits(read) -> Limits:
    """As text-to-video's; the step-distilled checkpoint (use_meanflow: a second timestep, the
    next one, on every forward) is refused until the loop passes it."""
    if read("transformer/config.json").get("use_meanflow"):
        raise UserError("this HunyuanVideo 1.5 checkpoint is step-distilled (use_meanflow: true), which unison does "
                        "not run yet; use a checkpoint without it (480p_i2v, 720p_i2v, or their cfg-distilled ones)")
    return t2v_limits(read)
