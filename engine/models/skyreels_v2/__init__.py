"""SkyReels-V2, text- and image-to-video (diffusers' SkyReelsV2Pipeline and
SkyReelsV2ImageToVideoPipeline): the Wan 2.1 architecture under its own transformer class, so
what serves unchanged is Wan's (engine/models/wan/), shared by subclassing or by name.

- hooks: SkyReelsHooks and SkyReelsImageHooks (WanHooks without an expert switch)
- parallel: its TokenPlan (Wan's attention processors; its blocks also take a causal mask)
- published: the Hub checkpoints' configs
- tiny: the tiny presets (Wan's tiny parts and a tiny SkyReelsV2Transformer3DModel)
- forcing: the diffusion-forcing hooks (SkyReelsV2DiffusionForcing{,ImageToVideo}Pipeline), whose
  loop is engine/windows.py's: a long video window by window, a timestep per frame
"""

from __future__ import annotations

import dataclasses

from unison.engine.models.skyreels_v2 import published
from unison.engine.models.skyreels_v2.forcing import ForcingHooks, ForcingImageHooks
from unison.engine.models.skyreels_v2.forcing import forward_inputs as forcing_inputs
from unison.engine.models.skyreels_v2.hooks import SkyReelsHooks, SkyReelsImageHooks
from unison.engine.models.skyreels_v2.parallel import TOKEN_PLAN
from unison.engine.models.skyreels_v2.tiny import (tiny_configs, tiny_forcing_configs, tiny_forcing_pipeline,
                                                   tiny_pipeline)
from unison.engine.models.spec import MetaTransformer, ModelSpec, SamplingDefaults
from unison.engine.models.wan import CACHE_HINTS
from unison.engine.models.wan.hooks import attention_modules, limits
from unison.engine.models.wan.vae import WAN_VAE


def _spec(family: str, title: str, *, pipeline_class: str, hooks, defaults: SamplingDefaults, text: int,
          checkpoints, encoders=("text_encoder",)) -> ModelSpec:
    i2v = hooks.i2v
    return ModelSpec(
        family=family, title=title, pipeline_class=pipeline_class, transformer_class="SkyReelsV2Transformer3DModel",
        experts=("transformer",), text_encoders=encoders, fps=24, size_multiple=16, temporal_factor=4,
        embedded_guidance=False, block_lists=("blocks",), defaults=defaults,
        tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0, max_sequence_length=text),
        matches=lambda index: index.get("_class_name") == pipeline_class,
        build_tiny=lambda seed: tiny_pipeline(seed, i2v=i2v), hooks=hooks(family, title=title),
        token_plan=TOKEN_PLAN, displaced_patches=True, vae_tiling=WAN_VAE, needs_image=i2v,
        attention_modules=attention_modules, limits=limits, tiny_configs=tiny_configs(i2v), cache_hints=CACHE_HINTS,
        checkpoints=checkpoints, block_count=lambda config: int(config.get("num_layers", 32)),  # diffusers' default
    )


# Defaults: the pipelines' own __call__ defaults (diffusers 0.42: 544x960, 97 frames, 50 steps, guidance
# 6.0 for T2V and 5.0 for I2V, 512 text tokens); fps 24 as diffusers' examples write the video.
SKYREELS_T2V = _spec(
    "skyreels-v2", "SkyReels-V2 T2V (14B; 540p, 720p)", pipeline_class="SkyReelsV2Pipeline", hooks=SkyReelsHooks,
    defaults=SamplingDefaults(height=544, width=960, frames=97, steps=50, guidance=6.0, max_sequence_length=512),
    text=32, checkpoints=published.T2V)

SKYREELS_I2V = _spec(
    "skyreels-v2-i2v", "SkyReels-V2 I2V (14B; 540p, 720p)", pipeline_class="SkyReelsV2ImageToVideoPipeline",
    hooks=SkyReelsImageHooks, encoders=("text_encoder", "image_encoder"),
    defaults=SamplingDefaults(height=544, width=960, frames=97, steps=50, guidance=5.0, max_sequence_length=512),
    text=512, checkpoints=published.I2V)


def _forcing(family: str, title: str, *, pipeline_class: str, hooks, guidance: float, checkpoints,
             also: tuple[str, ...] = ()) -> ModelSpec:
    """A diffusion-forcing spec; `also`: other pipeline classes whose saved folders it serves."""
    i2v = hooks.i2v
    classes = (pipeline_class, *also)
    spec = _spec(family, title, pipeline_class=pipeline_class, hooks=hooks, text=32, checkpoints=checkpoints,
                 defaults=SamplingDefaults(height=544, width=960, frames=97, steps=50, guidance=guidance,
                                           max_sequence_length=512, window_frames=97))
    return dataclasses.replace(
        spec, forcing=True, needs_image=i2v, meta=MetaTransformer(inputs=forcing_inputs),
        matches=lambda index: index.get("_class_name") in classes, build_tiny=lambda seed: tiny_forcing_pipeline(seed, i2v=i2v),
        tiny_configs=tiny_forcing_configs(),
        # Tiny: 9-frame windows (3 latent frames), so that 17 frames with a 5-frame overlap are 3 windows.
        tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0, max_sequence_length=32,
                                       window_frames=9))


# Defaults: the DF pipelines' own __call__ defaults (diffusers 0.42: 544x960, 97 frames, base_num_frames
# 97, 50 steps, guidance 6.0 for T2V and 5.0 for I2V, 512 text tokens, fps 24).
SKYREELS_DF = _forcing("skyreels-v2-df", "SkyReels-V2 DF T2V (diffusion forcing; 1.3B, 14B)",
                       pipeline_class="SkyReelsV2DiffusionForcingPipeline", hooks=ForcingHooks, guidance=6.0,
                       checkpoints=published.DF, also=("SkyReelsV2DiffusionForcingVideoToVideoPipeline",))
SKYREELS_DF_I2V = _forcing("skyreels-v2-df-i2v", "SkyReels-V2 DF I2V (diffusion forcing; 1.3B, 14B)",
                           pipeline_class="SkyReelsV2DiffusionForcingImageToVideoPipeline", hooks=ForcingImageHooks,
                           guidance=5.0, checkpoints=published.DF_I2V)

SPECS = (SKYREELS_T2V, SKYREELS_I2V, SKYREELS_DF, SKYREELS_DF_I2V)
