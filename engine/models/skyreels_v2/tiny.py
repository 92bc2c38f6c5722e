"""SkyReels-V2's tiny random-weight presets, built in-process and offline from Wan's tiny parts
(the same VAE, umT5 and CLIP encoders) and a tiny SkyReelsV2Transformer3DModel."""

from __future__ import annotations

from unison.engine.models.tiny import tiny_tokenizer
from unison.engine.models.wan.tiny import TINY_IMAGE, tiny_image_encoder, tiny_parts, tiny_transformer


def tiny_pipeline(seed: int, *, i2v: bool):
    from diffusers import SkyReelsV2ImageToVideoPipeline, SkyReelsV2Pipeline

    vae, text_encoder, scheduler = tiny_parts(seed)
    # Image-to-video: 16 noisy + 4 mask + 16 image latent channels in, and CLIP image tokens.
    transformer = tiny_transformer(seed + 1, channels=16, in_channels=36 if i2v else None,
                                   image_dim=TINY_IMAGE if i2v else None, cls="SkyReelsV2Transformer3DModel")
    common = dict(tokenizer=tiny_tokenizer(bos=False, eos=True), text_encoder=text_encoder, vae=vae,
                  scheduler=scheduler, transformer=transformer)
    if not i2v:
        return SkyReelsV2Pipeline(**common)
    encoder, processor = tiny_image_encoder(seed + 3)
    return SkyReelsV2ImageToVideoPipeline(image_encoder=encoder, image_processor=processor, **common)


def tiny_configs(i2v: bool) -> dict[str, dict]:
    """The tiny preset's config values a plan reads (as tiny_pipeline builds them)."""
    transformer = {"rope_max_seq_len": 32, "patch_size": [1, 2, 2], "num_layers": 3}
    if i2v:
        transformer.update(image_dim=TINY_IMAGE, pos_embed_seq_len=None)
    return {"transformer/config.json": transformer,
            "vae/config.json": {"scale_factor_spatial": 8, "scale_factor_temporal": 4}}


def tiny_forcing_pipeline(seed: int, *, i2v: bool):
    """The diffusion-forcing presets: a tiny DF transformer with the fps embedding (as DF-1.3B's)
    under diffusers' DF text- or image-to-video pipeline (no CLIP encoder: the picture is VAE-encoded)."""
    from diffusers import SkyReelsV2DiffusionForcingImageToVideoPipeline, SkyReelsV2DiffusionForcingPipeline

    vae, text_encoder, scheduler = tiny_parts(seed)
    transformer = tiny_transformer(seed + 1, channels=16, cls="SkyReelsV2Transformer3DModel", inject_sample_info=True)
    cls = SkyReelsV2DiffusionForcingImageToVideoPipeline if i2v else SkyReelsV2DiffusionForcingPipeline
    return cls(tokenizer=tiny_tokenizer(bos=False, eos=True), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
               transformer=transformer)


def tiny_forcing_configs() -> dict[str, dict]:
    return {"transformer/config.json": {"rope_max_seq_len": 32, "patch_size": [1, 2, 2], "num_layers": 3,
                                        "num_frame_per_block": 1, "inject_sample_info": True},
            "vae/config.json": {"scale_factor_spatial": 8, "scale_factor_temporal": 4}}
