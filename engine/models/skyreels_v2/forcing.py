"""SkyReels-V2 diffusion forcing (diffusers' SkyReelsV2DiffusionForcingPipeline and
SkyReelsV2DiffusionForcingImageToVideoPipeline): the loop is engine/windows.py's; these hooks are
what the family adds to it.

- The text is encoded as SkyReels-V2's other pipelines encode it (Wan's umT5 encoding).
- Every forward takes `enable_diffusion_forcing=True` (the modulation becomes per token: a
  timestep per frame) and, for checkpoints with inject_sample_info (DF-1.3B), the fps embedding's
  index: 0 for 16 fps, 1 for any other rate, as diffusers maps it.
- The causal block is the transformer's `num_frame_per_block` (diffusers' `_set_ar_attention`,
  a config change that outlives the call): set before every render, so one render's choice never
  leaks into the next.
- Image-to-video takes no CLIP tokens: the picture is VAE-encoded (the distribution's mode,
  normalised) to one latent frame, given to the first window as a finished frame. The step matrix
  of every window is built against the full window length (the text-to-video pipeline builds it
  against each window's own length): the two pipelines differ there, and so do these hooks.
  One checkpoint serves both: `skyreels-v2-df` takes an optional picture (then it is the
  image-to-video pipeline's render), `skyreels-v2-df-i2v` requires one.
"""

from __future__ import annotations

import torch

from unison.engine import images, schedulers
from unison.engine.errors import UserError
from unison.engine.models.spec import Conditioning
from unison.engine.models.skyreels_v2.hooks import SkyReelsHooks
from unison.engine.models.wan.vae import decode_stream


class ForcingHooks(SkyReelsHooks):
    """SkyReels-V2 DF text-to-video."""

    def __init__(self, family: str, *, title: str):
        super().__init__(family, title=title)
        self.takes_image = True
        self.clip_tokens = False
        self.takes_last = False

    def base_is_window(self, sampling) -> bool:
        """Each window's step matrix is built against the window's own length (diffusers' T2V
        pipeline), not the full window's (its I2V pipeline)."""
        return sampling.image is None

    def given_frames(self, sampling) -> int:
        """Latent frames the first window is given (an image-to-video picture's)."""
        return 0 if sampling.image is None else 1

    def check_sampling(self, sampling) -> None:
        images.check_images(sampling, family=self.family, takes_image=self.takes_image, needs_image=self.i2v,
                            takes_last=False)
        schedulers.check(sampling.scheduler, sampling.flow_shift, family=self.family, sigmas=False)
        if sampling.true_cfg_scale is not None or sampling.guidance_2 is not None:
            raise UserError(f"{self.family} runs classifier-free guidance with --guidance alone")

    def layout_problem(self, sampling, parallel) -> str | None:
        if sampling.causal_block_size > 1 and (parallel.ring > 1 or parallel.patch > 1 or
                                               getattr(parallel, "attention_backend", "auto") == "xfuser"):
            return (f"sampling.causal_block_size {sampling.causal_block_size} puts a block-causal mask on every "
                    f"self-attention, which Ring, patch parallelism and the xfuser backend do not split; use "
                    f"ulysses (and cfg, shard_weights), or causal_block_size 1")
        return None

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        conditioning = super().encode(pipe, dataclass_without_picture(sampling), device)
        fps = [0 if sampling.fps == 16 else 1]  # diffusers' mapping of the rate to the embedding's index
        for branch in (conditioning.cond, conditioning.uncond):
            if branch is not None:
                branch.update(enable_diffusion_forcing=True, fps=fps)
        if sampling.image is not None:
            conditioning.video["given"] = _picture_latents(pipe, sampling, device)
        return conditioning

    def set_block(self, pipe, block: int) -> None:
        pipe.transformer._set_ar_attention(block)

    def first_prefix(self, conditioning: Conditioning) -> torch.Tensor | None:
        """The latent frames the first window is given (None: text-to-video, none)."""
        return conditioning.video.get("given")

    def latent_shape(self, pipe, sampling) -> tuple[int, int, int, int]:
        """(batch, channels, height, width) of the latents; frames come per window."""
        return (1, pipe.transformer.config.in_channels, sampling.height // pipe.vae_scale_factor_spatial,
                sampling.width // pipe.vae_scale_factor_spatial)

    def condition_frames(self, sampling) -> int:
        return 1 if sampling.image is not None else 0

    def decode_stream(self, vae, pieces):
        """The video decoded window by window, the causal VAE's cache carried across (wan/vae.py)."""
        return decode_stream(vae, pieces)


class ForcingImageHooks(ForcingHooks):
    """SkyReels-V2 DF image-to-video: the picture's latent frame given to the first window."""

    i2v = True

    def model_input(self, pipe, latents, conditioning):
        return latents


def dataclass_without_picture(sampling):
    """The sampling settings as Wan's text encoding reads them (the picture is encoded here)."""
    import dataclasses

    return dataclasses.replace(sampling, image=None, last_image=None)


def _picture_latents(pipe, sampling, device: torch.device) -> torch.Tensor:
    """The picture VAE-encoded to one latent frame, the distribution's mode, normalised (as
    diffusers' DF image-to-video pipeline; its float32 preprocessing, then the VAE's dtype)."""
    vae = pipe.vae
    picture = images.for_vae(pipe.video_processor, images.read(sampling.image), height=sampling.height,
                             width=sampling.width, mode=sampling.image_resize).to(device, torch.float32)
    encoded = vae.encode(picture.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode().to(device, torch.float32)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, torch.float32)
    return (encoded - mean) * inv_std
