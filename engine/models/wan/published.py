"""Wan's published diffusers checkpoints: their components' configs (for `unison plan` without a
local copy) and their transformers' shapes (which published cache preset a folder takes).

Configs: the config.json files on the Hugging Face Hub (Wan-AI/Wan2.1-T2V-1.3B-Diffusers,
Wan2.1-T2V-14B-Diffusers, Wan2.2-T2V-A14B-Diffusers, Wan2.2-TI2V-5B-Diffusers,
Wan2.1-I2V-14B-480P-Diffusers, Wan2.2-I2V-A14B-Diffusers); where a value equals the diffusers
class default it is left out.

Shapes: diffusers' scripts/convert_wan_to_diffusers.py get_transformer_config (huggingface/diffusers
@58eb52c0: Wan-T2V-1.3B L329-349, Wan-T2V-14B L350-370, Wan-I2V-14B-480p/720p L371-414 (identical
shapes; FLF2V-14B, L415-438, adds pos_embed_seq_len 514, so null here keeps it out), Wan2.2-I2V-14B
L508-528, Wan2.2-T2V-A14B L529-549 (both experts, L1173), Wan2.2-TI2V-5B L550-570). Presets:
caching/magcache_presets.py (MagCache's own tables, as named there) and caching/teacache.py.
"""

from __future__ import annotations

from unison.engine.models.spec import Checkpoint, Component, Pick

_WAN = dict(patch_size=[1, 2, 2], in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_UMT5_XXL = ("transformers", "UMT5EncoderModel", dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu"))
_WAN_VAE = ("diffusers", "AutoencoderKLWan", {})
_WAN22_VAE = ("diffusers", "AutoencoderKLWan", dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48))


def _wan(**size) -> Component:
    return ("diffusers", "WanTransformer3DModel", {**_WAN, **size})


_WAN_14B = _wan(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
_WAN_I2V_14B = _wan(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=36)
# Wan 2.1 I2V: open-clip ViT-H/14 as transformers' CLIPVisionModel (257 tokens of 1280).
_CLIP_VIT_H = ("transformers", "CLIPVisionModel", dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu"))


def _shape(layers: int, heads: int, in_channels: int, ffn: int, **more: object) -> tuple[tuple[str, object], ...]:
    return (("num_layers", layers), ("num_attention_heads", heads), ("in_channels", in_channels),
            ("ffn_dim", ffn), *more.items())


def _by_side(side: int, low: str, high: str, label: str) -> tuple[Pick, Pick]:
    return (Pick(low, shorter_side_at_most=side, why=f"{label}: the video's shorter side is at most {side}"),
            Pick(high, why=f"not {label}: the video's shorter side is over {side}"))


WAN21_T2V = (
    Checkpoint(name="wan2.1-1.3b", title="Wan 2.1 T2V 1.3B", hub_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
               components={"transformer": _wan(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                                num_layers=30),
                           "text_encoder": _UMT5_XXL, "vae": _WAN_VAE},
               shape=_shape(30, 12, 16, 8960),
               presets={"magcache": (Pick("wan2.1-t2v-1.3b"),), "teacache": (Pick("wan2.1-t2v-1.3b"),)},
               suite_case="Wan 2.1 1.3B"),
    Checkpoint(name="wan2.1-14b", title="Wan 2.1 T2V 14B", hub_ids=("Wan-AI/Wan2.1-T2V-14B-Diffusers",),
               components={"transformer": _WAN_14B, "text_encoder": _UMT5_XXL, "vae": _WAN_VAE},
               shape=_shape(40, 40, 16, 13824),
               presets={"magcache": (Pick("wan2.1-t2v-14b"),), "teacache": (Pick("wan2.1-t2v-14b"),)},
               suite_case="Wan 2.1 14B"),
)
WAN21_I2V = (
    Checkpoint(name="wan2.1-i2v-14b", title="Wan 2.1 I2V 14B", default=True,
               hub_ids=("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
               components={"transformer": ("diffusers", "WanTransformer3DModel",
                                           {**_WAN_I2V_14B[2], "image_dim": 1280, "added_kv_proj_dim": 5120}),
                           "text_encoder": _UMT5_XXL, "image_encoder": _CLIP_VIT_H, "vae": _WAN_VAE},
               shape=_shape(40, 40, 36, 13824, image_dim=1280, pos_embed_seq_len=None),
               presets={"magcache": _by_side(480, "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "480p"),
                        "teacache": _by_side(480, "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "480p")}),
)
WAN22_T2V = (
    Checkpoint(name="wan2.2-a14b", title="Wan 2.2 T2V A14B", default=True,
               hub_ids=("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
               components={"transformer": _WAN_14B, "transformer_2": _WAN_14B, "text_encoder": _UMT5_XXL,
                           "vae": _WAN_VAE},
               shape=_shape(40, 40, 16, 13824), presets={"magcache": (Pick("wan2.2-t2v-a14b"),)}),
)
WAN22_I2V = (
    Checkpoint(name="wan2.2-i2v-a14b", title="Wan 2.2 I2V A14B", default=True,
               hub_ids=("Wan-AI/Wan2.2-I2V-A14B-Diffusers",),
               components={"transformer": _WAN_I2V_14B, "transformer_2": _WAN_I2V_14B, "text_encoder": _UMT5_XXL,
                           "vae": _WAN_VAE},
               shape=_shape(40, 40, 36, 13824, image_dim=None), presets={"magcache": (Pick("wan2.2-i2v-a14b"),)}),
)
WAN22_TI2V = (
    Checkpoint(name="wan2.2-ti2v-5b", title="Wan 2.2 TI2V 5B", default=True,
               hub_ids=("Wan-AI/Wan2.2-TI2V-5B-Diffusers",),
               components={"transformer": _wan(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336,
                                               num_layers=30, in_channels=48, out_channels=48),
                           "text_encoder": _UMT5_XXL, "vae": _WAN22_VAE},
               shape=_shape(30, 24, 48, 14336),
               presets={"magcache": (Pick("wan2.2-ti2v-5b", image=False, why="text to video: no sampling.image"),
                                     Pick("wan2.2-ti2v-5b-i2v", image=True, why="image to video: sampling.image given"))}),
)
