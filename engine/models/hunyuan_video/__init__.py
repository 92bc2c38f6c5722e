"""HunyuanVideo, text- and image-to-video (diffusers' HunyuanVideoPipeline and
HunyuanVideoImageToVideoPipeline): one folder holds all unison knows of them.

- t2v: the loop's calls (HunyuanHooks), guidance checks, limits, attention modules, tiny parts
- i2v: image-to-video's calls (HunyuanImageHooks, a subclass), both condition types
- parallel: where the sequence is split and gathered, joint attention's parallel processors
- vae: how the VAE decodes one tile (parallel decode)
"""

from __future__ import annotations

from unison.caching.base import CacheHints
from unison.engine.models.hunyuan_video import i2v, t2v
from unison.engine.models.hunyuan_video.parallel import BLOCK_LISTS, TOKEN_PLAN
from unison.engine.models.hunyuan_video.vae import HUNYUAN_VAE
import torch

from unison.engine.models.spec import Checkpoint, MetaTransformer, ModelSpec, Pick, SamplingDefaults


def _teacache_indicator(block, args, kwargs):
    """TeaCache's HunyuanVideo indicator: the first dual-stream block's modulated, normed image
    tokens (split with the tokens)."""
    temb = kwargs["temb"] if "temb" in kwargs else args[2]
    return block.norm1(args[0], emb=temb)[0], True


CACHE_HINTS = CacheHints(indicator=_teacache_indicator, blocks_return_text=True,
                         predicted_modules=(r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
                                            r"single_transformer_blocks\.\d+"))
"""TaylorSeer's full form predicts the dual-stream blocks' attention and both MLPs, and each
single-stream block whole."""

# Shape: diffusers' scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS
# ["HYVideo-T/2-cfgdistill"] (L146-164: the I2V checkpoints differ in image_condition_type, and the
# 33-channel one in in_channels). Configs: hunyuanvideo-community/HunyuanVideo's config.json files.
HUNYUAN_T2V = Checkpoint(
    name="hunyuanvideo", title="HunyuanVideo T2V", hub_ids=("hunyuanvideo-community/HunyuanVideo",),
    components={
        "transformer": ("diffusers", "HunyuanVideoTransformer3DModel", {}),
        # llava-llama-3-8b's language model, the hidden states of which HunyuanVideo reads.
        "text_encoder": ("transformers", "LlamaModel", dict(
            vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)),
        "text_encoder_2": ("transformers", "CLIPTextModel", dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)),
        "vae": ("diffusers", "AutoencoderKLHunyuanVideo", {})},
    shape=(("num_layers", 20), ("num_single_layers", 40), ("num_attention_heads", 24),
           ("attention_head_dim", 128), ("in_channels", 16), ("image_condition_type", None)),
    presets={"magcache": (Pick("hunyuanvideo-544p", shorter_side_at_most=544,
                               why="544p: the video's shorter side is at most 544"),
                          Pick("hunyuanvideo-720p", why="not 544p: the video's shorter side is over 544")),
             "teacache": (Pick("hunyuanvideo"),)},
    default=True, suite_case="HunyuanVideo")

def _meta_inputs(config: dict, x: torch.Tensor, text_tokens: int, dtype: torch.dtype) -> dict:
    """The forward's inputs on the meta device: the text with its mask, the pooled CLIP text and
    the embedded guidance."""
    meta = x.device
    return dict(hidden_states=x, timestep=torch.empty(1, device=meta),
                encoder_hidden_states=torch.empty(1, text_tokens, config.get("text_embed_dim", 4096), device=meta,
                                                  dtype=dtype),
                encoder_attention_mask=torch.empty(1, text_tokens, device=meta, dtype=torch.bool),
                pooled_projections=torch.empty(1, config.get("pooled_projection_dim", 768), device=meta, dtype=dtype),
                guidance=torch.empty(1, device=meta), return_dict=False)


META = MetaTransformer(default_heads=24, one_block={"num_layers": 1, "num_single_layers": 1},
                       single_blocks=lambda config: int(config.get("num_single_layers", 40)), inputs=_meta_inputs)
"""diffusers' class defaults: 24 heads, 20 dual- and 40 single-stream blocks."""

_COMMON = dict(transformer_class="HunyuanVideoTransformer3DModel", experts=("transformer",),
               text_encoders=("text_encoder", "text_encoder_2"), fps=24, size_multiple=16, temporal_factor=4,
               embedded_guidance=True, joint_text=True, block_lists=BLOCK_LISTS,
               token_plan=TOKEN_PLAN, attention_modules=t2v.attention_modules,
               vae_tiling=HUNYUAN_VAE, displaced_patches=True,
               cache_hints=CACHE_HINTS, meta=META,
               # diffusers' defaults: 20 dual-stream and 40 single-stream blocks
               block_count=lambda config: int(config.get("num_layers", 20)) + int(config.get("num_single_layers", 40)))

HUNYUAN_VIDEO = ModelSpec(
    family="hunyuanvideo", title="HunyuanVideo T2V", pipeline_class="HunyuanVideoPipeline",
    defaults=SamplingDefaults(height=720, width=1280, frames=129, steps=50, guidance=6.0,
                              true_cfg_scale=1.0, max_sequence_length=256),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=6.0,
                                   true_cfg_scale=1.0, max_sequence_length=32),
    matches=lambda index: index.get("_class_name") == "HunyuanVideoPipeline", build_tiny=t2v.tiny_pipeline,
    hooks=t2v.HunyuanHooks(), limits=t2v.limits,
    tiny_configs={"text_encoder/config.json": {"max_position_embeddings": 1024},
                  "transformer/config.json": {"num_layers": 2, "num_single_layers": 2}},
    checkpoints=(HUNYUAN_T2V,), **_COMMON,
)

HUNYUAN_VIDEO_I2V = ModelSpec(
    family="hunyuanvideo-i2v", title="HunyuanVideo I2V (latent_concat, token_replace)",
    pipeline_class="HunyuanVideoImageToVideoPipeline", needs_image=True,
    # diffusers' __call__ defaults (guidance_scale 1.0; its example uses 6.0 for HunyuanVideo-I2V).
    defaults=SamplingDefaults(height=720, width=1280, frames=129, steps=50, guidance=1.0, true_cfg_scale=1.0,
                              max_sequence_length=256),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=6.0, true_cfg_scale=1.0,
                                   max_sequence_length=32),
    matches=lambda index: index.get("_class_name") == "HunyuanVideoImageToVideoPipeline",
    build_tiny=i2v.tiny_pipeline, hooks=i2v.HunyuanImageHooks(), limits=i2v.limits,
    tiny_configs={"text_encoder/config.json": {"text_config": {"max_position_embeddings": 1024}},
                  "transformer/config.json": {"num_layers": 2, "num_single_layers": 2}},
    **_COMMON,
)

SPECS = (HUNYUAN_VIDEO, HUNYUAN_VIDEO_I2V)
