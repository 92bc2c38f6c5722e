"""SkyReels-V2's published diffusers checkpoints, for `unison plan` without a local copy.

Transformer configs: diffusers' scripts/convert_skyreelsv2_to_diffusers.py get_transformer_config
(huggingface/diffusers @00849fd4): "SkyReels-V2-I2V-14B-720p" as listed there; the T2V 14B
checkpoints take the 14B shape listed there for "SkyReels-V2-DF-14B-540P/720P" (the same
transformer class and sizes, sample-info injection off). Those, and the 540P I2V checkpoint (the
720P one's shape), are not checked against the Hub's config.json here. Text encoder and VAE:
Wan 2.1's (umT5-XXL, AutoencoderKLWan, as the script loads them); image encoder: CLIP ViT-H/14
with projection (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as the script loads it).
"""

from __future__ import annotations

from unison.engine.models.spec import Checkpoint, Component
from unison.engine.models.wan.published import _UMT5_XXL, _WAN_VAE

_BASE = dict(patch_size=[1, 2, 2], attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256,
             qk_norm="rms_norm_across_heads", text_dim=4096, out_channels=16)
_T2V_14B: Component = ("diffusers", "SkyReelsV2Transformer3DModel", dict(
    _BASE, ffn_dim=13824, num_attention_heads=40, num_layers=40, in_channels=16, inject_sample_info=False))
_I2V_14B: Component = ("diffusers", "SkyReelsV2Transformer3DModel", dict(
    _BASE, ffn_dim=13824, num_attention_heads=40, num_layers=40, in_channels=36, image_dim=1280,
    added_kv_proj_dim=5120))
_CLIP_VIT_H: Component = ("transformers", "CLIPVisionModelWithProjection", dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu"))


def _shape(config: dict) -> tuple[tuple[str, object], ...]:
    return tuple((key, config.get(key)) for key in ("num_layers", "num_attention_heads", "in_channels", "ffn_dim",
                                                    "image_dim"))


T2V = tuple(
    Checkpoint(name=f"skyreels-v2-14b-{size}", title=f"SkyReels-V2 T2V 14B {size.upper()}",
               hub_ids=(f"Skywork/SkyReels-V2-T2V-14B-{size.upper()}-Diffusers",),
               components={"transformer": _T2V_14B, "text_encoder": _UMT5_XXL, "vae": _WAN_VAE},
               shape=_shape(_T2V_14B[2]))
    for size in ("540p", "720p"))
I2V = tuple(
    Checkpoint(name=f"skyreels-v2-i2v-14b-{size}", title=f"SkyReels-V2 I2V 14B {size.upper()}",
               hub_ids=(f"Skywork/SkyReels-V2-I2V-14B-{size.upper()}-Diffusers",),
               components={"transformer": _I2V_14B, "text_encoder": _UMT5_XXL, "image_encoder": _CLIP_VIT_H,
                           "vae": _WAN_VAE},
               shape=_shape(_I2V_14B[2]))
    for size in ("540p", "720p"))


# Diffusion forcing (diffusers' get_transformer_config for "SkyReels-V2-DF-1.3B-540P", "-DF-14B-540P",
# "-DF-14B-720P"; huggingface/diffusers @2843b3d3): the 14B ones take the T2V 14B shape; the 1.3B one
# is Wan 2.1 1.3B's shape with the fps embedding (inject_sample_info). One checkpoint serves text- and
# image-to-video (SkyworkAI/SkyReels-V2's README; diffusers' DF I2V pipeline loads the same repos).
_DF_1_3B: Component = ("diffusers", "SkyReelsV2Transformer3DModel", dict(
    _BASE, ffn_dim=8960, num_attention_heads=12, num_layers=30, in_channels=16, inject_sample_info=True))
_DF = (("1.3b-540p", _DF_1_3B), ("14b-540p", _T2V_14B), ("14b-720p", _T2V_14B))
DF = tuple(
    Checkpoint(name=f"skyreels-v2-df-{name}", title=f"SkyReels-V2 DF {name.split('-')[0].upper()} "
                                                    f"{name.split('-')[1].upper()}",
               hub_ids=(f"Skywork/SkyReels-V2-DF-{name.split('-')[0].upper()}-{name.split('-')[1].upper()}-Diffusers",),
               components={"transformer": config, "text_encoder": _UMT5_XXL, "vae": _WAN_VAE},
               shape=_shape(config[2]) + (("inject_sample_info", config[2]["inject_sample_info"]),),
               default=name == "14b-540p")
    for name, config in _DF)
DF_I2V = tuple(
    Checkpoint(name=f"skyreels-v2-df-i2v-{c.name.removeprefix('skyreels-v2-df-')}", title=f"{c.title} (image-to-video)",
               hub_ids=c.hub_ids, components=c.components, shape=c.shape, default=c.default)
    for c in DF)
