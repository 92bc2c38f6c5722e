"""HunyuanVideo 1.5, text- and image-to-video (diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline): one folder holds all unison knows of it. What serves unchanged is HunyuanVideo's (its joint-attention processors, TeaCache
indicator and TaylorSeer modules; sigmas and timesteps), shared by subclassing or by name.

- hooks: HunyuanVideo15Hooks (Qwen2.5-VL and ByT5 prompts, the guider's CFG, latents in the
  transformer's dtype with an empty condition beside them)
- i2v: HunyuanVideo15ImageHooks (the picture's SigLIP tokens and latents; the size from the picture)
- parallel: its TokenPlan (HunyuanVideo's processors; the real text length from its two text
  masks and its image embeddings)
- meta: its inputs and a stand-in for its forward on the meta device (`unison plan`)
- published: the Hub checkpoints' configs (480p, 720p; T2V and I2V)
- tiny: the tiny preset (tiny Qwen2.5-VL and T5 encoders, a chat-template tokenizer, ByT5's bytes)
- vae: how the VAE's tiled decode cuts and decodes a tile (parallel decode)
The step-distilled I2V checkpoint (use_meanflow) is refused before loading.
"""

from __future__ import annotations

from unison.engine.models.hunyuan_video import CACHE_HINTS
from unison.engine.models.hunyuan_video15 import i2v, published
from unison.engine.models.hunyuan_video15.hooks import HunyuanVideo15Hooks, limits
from unison.engine.models.hunyuan_video15.meta import META
from unison.engine.models.hunyuan_video15.parallel import TOKEN_PLAN
from unison.engine.models.hunyuan_video15.i2v import HunyuanVideo15ImageHooks
from unison.engine.models.hunyuan_video15.tiny import TINY_TARGET_SIZE, tiny_pipeline
from unison.engine.models.hunyuan_video15.vae import HUNYUAN15_VAE
from unison.engine.models.spec import ModelSpec, SamplingDefaults


def _attention_modules(transformer):
    return {"self": [block.attn for block in transformer.transformer_blocks]}


def _spec(family: str, title: str, *, pipeline_class: str, hooks, limits, checkpoints, i2v: bool,
          image_resize: str) -> ModelSpec:
    return ModelSpec(
        family=family, title=title, pipeline_class=pipeline_class, transformer_class="HunyuanVideo15Transformer3DModel",
        experts=("transformer",), text_encoders=("text_encoder", "text_encoder_2"), fps=24, size_multiple=16,
        temporal_factor=4, embedded_guidance=False, block_lists=("transformer_blocks",),
        # The pipelines' own defaults: 121 frames, 50 steps; the prompts are padded to 1000 Qwen
        # tokens. 480p at 16:9 (image-to-video: the size its picture gives, i2v.py); guidance 6.0 (the
        # conversion script's guider for every non-distilled checkpoint, published.py).
        defaults=SamplingDefaults(height=480, width=848, frames=121, steps=50, guidance=6.0, max_sequence_length=1000,
                                  image_resize=image_resize),
        # The tiny tokenizer spells the chat template's system prompt in about 230 tokens (Qwen's: the
        # 108 the pipeline crops), so 160 holds the rest of it and a short prompt.
        tiny_defaults=SamplingDefaults(height=32, width=32, frames=9, steps=6, guidance=6.0, max_sequence_length=160,
                                       image_resize=image_resize),
        matches=lambda index: index.get("_class_name") == pipeline_class,
        build_tiny=lambda seed: tiny_pipeline(seed, i2v=i2v), hooks=hooks, limits=limits, token_plan=TOKEN_PLAN,
        vae_tiling=HUNYUAN15_VAE, displaced_patches=True, attention_modules=_attention_modules,
        cache_hints=CACHE_HINTS, joint_text=True, meta=META, checkpoints=checkpoints, needs_image=i2v,
        tiny_configs={"transformer/config.json": {"num_layers": 4, "target_size": TINY_TARGET_SIZE},
                      "vae/config.json": {"spatial_compression_ratio": 4}},
        block_count=lambda config: int(config.get("num_layers", 54)),  # diffusers' default
    )


HUNYUAN_VIDEO15 = _spec("hunyuanvideo1.5", "HunyuanVideo 1.5 T2V", pipeline_class="HunyuanVideo15Pipeline",
                        hooks=HunyuanVideo15Hooks(), limits=limits, checkpoints=published.T2V, i2v=False,
                        image_resize="stretch")
HUNYUAN_VIDEO15_I2V = _spec("hunyuanvideo1.5-i2v", "HunyuanVideo 1.5 I2V",
                            pipeline_class="HunyuanVideo15ImageToVideoPipeline", hooks=HunyuanVideo15ImageHooks(),
                            limits=i2v.limits, checkpoints=published.I2V, i2v=True, image_resize="crop")

SPECS = (HUNYUAN_VIDEO15, HUNYUAN_VIDEO15_I2V)
