"""Wan's tiny random-weight presets (every variant), built in-process and offline: the tests'
models and the embedded default (configs/tiny-wan.yaml)."""

from __future__ import annotations

import torch

from unison.engine.models.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB, tiny_tokenizer


TINY_IMAGE = 32
"""The tiny CLIP vision encoder's input size and width (Wan 2.1 I2V preset)."""


def tiny_transformer(seed: int, *, channels: int, in_channels: int | None = None, image_dim: int | None = None,
                     cls: str = "WanTransformer3DModel", **extra):
    """The tiny Wan-architecture transformer (`cls`: diffusers' class of that architecture; `extra`:
    config values only that class takes)."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, cls)(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12,
        in_channels=in_channels or channels, out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=64,
        num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=image_dim, added_kv_proj_dim=48 if image_dim is not None else None, **extra,
    )


def tiny_image_encoder(seed: int):
    """A small CLIP vision encoder (2 layers, 32 wide, 8-pixel patches of a 32-pixel input: 17
    tokens) and its processor, built offline."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=TINY_IMAGE, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=TINY_IMAGE, patch_size=8,
                                               projection_dim=TINY_IMAGE))
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE,
                                                                                   "width": TINY_IMAGE})
    return encoder, processor


def tiny_pipeline(seed: int, *, variant: str):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    ti2v = variant == "wan2.2-ti2v"
    i2v = variant in ("wan-i2v", "wan2.2-i2v")
    two = variant in ("wan2.2", "wan2.2-i2v")
    vae, text_encoder, scheduler = tiny_parts(seed, ti2v=ti2v)
    channels = 48 if ti2v else 16
    # Image-to-video: 16 noisy + 4 mask + 16 image latent channels in; Wan 2.1 adds CLIP tokens.
    shape = dict(channels=channels, in_channels=36 if i2v else None,
                 image_dim=TINY_IMAGE if variant == "wan-i2v" else None)
    transformer = tiny_transformer(seed + 1, **shape)
    transformer_2 = tiny_transformer(seed + 2, **shape) if two else None
    common = dict(tokenizer=tiny_tokenizer(bos=False, eos=True), text_encoder=text_encoder, vae=vae,
                  scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
                  boundary_ratio=0.875 if two else None, expand_timesteps=ti2v)
    if not i2v:
        return WanPipeline(**common)
    encoder, processor = tiny_image_encoder(seed + 3) if variant == "wan-i2v" else (None, None)
    return WanImageToVideoPipeline(image_encoder=encoder, image_processor=processor, **common)


def tiny_parts(seed: int, *, ti2v: bool = False):
    """The tiny VAE, umT5 text encoder and scheduler, made in this order from `seed`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    if ti2v:
        # Wan 2.2's VAE: 48 latent channels, 2×2 patchified pixels, 16× spatial compression.
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        )
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=TINY_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID, bos_token_id=BOS_ID,
    ))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    return vae, text_encoder, scheduler


def tiny_configs(family: str) -> dict[str, dict]:
    """The tiny preset's config values that _limits reads (as tiny_pipeline builds them)."""
    spatial = 16 if family == "wan2.2-ti2v" else 8
    transformer = {"rope_max_seq_len": 32, "patch_size": [1, 2, 2], "num_layers": 3}
    if family == "wan-i2v":
        transformer.update(image_dim=TINY_IMAGE, pos_embed_seq_len=None)
    configs = {"transformer/config.json": transformer,
               "vae/config.json": {"scale_factor_spatial": spatial, "scale_factor_temporal": 4}}
    if family in ("wan2.2", "wan2.2-i2v"):
        configs["transformer_2/config.json"] = transformer
    return configs
