"""SkyReels-V2's loop hooks: Wan's, less what its pipelines do not have (an expert switch, one
timestep per token). SkyReelsV2Pipeline and SkyReelsV2ImageToVideoPipeline run Wan 2.1's loop with
the SkyReels-V2 transformer: the same text and CLIP image encoding, latents, picture condition
(the picture's latents and mask join the noisy latents), scheduler steps and VAE decode."""

from __future__ import annotations

from unison.engine.models.wan.hooks import WanHooks, WanImageHooks


class SkyReelsHooks(WanHooks):
    """SkyReels-V2 text-to-video."""

    def __init__(self, family: str, *, title: str):
        super().__init__(family, title=title)
        # Image-to-video takes CLIP image tokens beside the text (as Wan 2.1 I2V); one transformer.
        self.takes_image = self.clip_tokens = self.i2v
        self.two_experts = False

    def boundary_ratio(self, pipe) -> float | None:
        return None

    def per_token(self, pipe) -> bool:
        return False


class SkyReelsImageHooks(SkyReelsHooks, WanImageHooks):
    """SkyReels-V2 image-to-video: Wan 2.1 I2V's condition and model input."""
