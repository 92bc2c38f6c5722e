"""Wan 2.1 and Wan 2.2, every variant (diffusers' WanPipeline and WanImageToVideoPipeline): one
folder holds all unison knows of them.

- hooks: the loop's calls (WanHooks; WanImageHooks for image-to-video), limits, attention modules
- parallel: where the sequence is split and gathered, the sequence-parallel and PipeFusion processors
- published: the Hub checkpoints' configs and shapes, and their cache presets
- vae: how the VAE decodes one tile (parallel decode)
- tiny: the tiny random-weight presets
"""

from __future__ import annotations

from typing import Any

from unison.caching.base import CacheHints
from unison.engine.models.spec import ModelSpec, SamplingDefaults
from unison.engine.models.wan import published
from unison.engine.models.wan.hooks import WanHooks, WanImageHooks, attention_modules, limits
from unison.engine.models.wan.parallel import TOKEN_PLAN
from unison.engine.models.wan.tiny import tiny_configs, tiny_pipeline
from unison.engine.models.wan.vae import WAN_VAE


def _variant(index: dict[str, Any]) -> str | None:
    name = index.get("_class_name")
    if name not in ("WanPipeline", "WanImageToVideoPipeline"):
        return None
    second = index.get("transformer_2")
    has_second = isinstance(second, list) and second[0] is not None
    i2v = name == "WanImageToVideoPipeline"
    if has_second and index.get("boundary_ratio") is not None:
        return "wan2.2-i2v" if i2v else "wan2.2"
    if index.get("expand_timesteps"):
        return "wan2.2-ti2v"
    return "wan-i2v" if i2v else "wan"


def _teacache_indicator(block, args, kwargs):
    """TeaCache's Wan indicator: the first block's timestep modulation input (B, 6, D), per token
    on TI2V-5B (B, tokens, 6, D)."""
    modulation = kwargs["temb"] if "temb" in kwargs else args[2]
    return modulation, modulation.ndim == 4


CACHE_HINTS = CacheHints(indicator=_teacache_indicator, blocks_return_text=False,
                         predicted_modules=(r"blocks\.\d+\.(attn1|attn2|ffn)",))
"""TaylorSeer's full form predicts each block's self-attention, cross-attention and MLP outputs."""


def _spec(family: str, title: str, *, experts, defaults, tiny_defaults, checkpoints, size_multiple=16, fps=16,
          pipeline_class="WanPipeline", encoders=("text_encoder",), hooks=WanHooks) -> ModelSpec:
    return ModelSpec(
        family=family, title=title, pipeline_class=pipeline_class, text_encoders=encoders,
        transformer_class="WanTransformer3DModel", experts=experts, fps=fps,
        size_multiple=size_multiple, temporal_factor=4, embedded_guidance=False,
        block_lists=("blocks",), defaults=defaults, tiny_defaults=tiny_defaults,
        matches=lambda index: _variant(index) == family,
        build_tiny=lambda seed: tiny_pipeline(seed, variant=family), hooks=hooks(family),
        token_plan=TOKEN_PLAN, displaced_patches=True,
        vae_tiling=WAN_VAE, needs_image=hooks.i2v, per_token_timesteps=family == "wan2.2-ti2v",
        attention_modules=attention_modules, limits=limits, tiny_configs=tiny_configs(family),
        cache_hints=CACHE_HINTS, checkpoints=checkpoints,
        block_count=lambda config: int(config.get("num_layers", 40)),  # diffusers' default
    )


_TINY = SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0, max_sequence_length=32)

WAN21 = _spec(
    "wan", "Wan 2.1 T2V (1.3B, 14B)", experts=("transformer",), checkpoints=published.WAN21_T2V,
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=50, guidance=5.0,
                              max_sequence_length=512),
    tiny_defaults=_TINY,
)

WAN22 = _spec(
    "wan2.2", "Wan 2.2 T2V A14B (two experts)", experts=("transformer", "transformer_2"),
    checkpoints=published.WAN22_T2V,
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=40, guidance=4.0,
                              guidance_2=3.0, max_sequence_length=512),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0,
                                   guidance_2=3.0, max_sequence_length=32),
)

WAN22_TI2V = _spec(
    "wan2.2-ti2v", "Wan 2.2 TI2V-5B (text or image to video)", experts=("transformer",), size_multiple=32,
    fps=24, checkpoints=published.WAN22_TI2V,
    defaults=SamplingDefaults(height=704, width=1280, frames=121, steps=50, guidance=5.0,
                              max_sequence_length=512),
    tiny_defaults=_TINY,
)

WAN21_I2V = _spec(
    "wan-i2v", "Wan 2.1 I2V (14B 480p, 720p; FLF2V)", experts=("transformer",), hooks=WanImageHooks,
    pipeline_class="WanImageToVideoPipeline", encoders=("text_encoder", "image_encoder"),
    checkpoints=published.WAN21_I2V,
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=50, guidance=5.0,
                              max_sequence_length=512),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0, max_sequence_length=512),
)

WAN22_I2V = _spec(
    "wan2.2-i2v", "Wan 2.2 I2V A14B (two experts)", experts=("transformer", "transformer_2"), hooks=WanImageHooks,
    pipeline_class="WanImageToVideoPipeline", checkpoints=published.WAN22_I2V,
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=40, guidance=3.5,
                              guidance_2=3.5, max_sequence_length=512),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0,
                                   guidance_2=3.0, max_sequence_length=32),
)

SPECS = (WAN21, WAN22, WAN22_TI2V, WAN21_I2V, WAN22_I2V)
