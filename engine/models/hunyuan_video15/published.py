"""HunyuanVideo 1.5's published diffusers checkpoints, for `unison plan` without a local copy.

Transformer and VAE: diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py builds both from
the class defaults (HunyuanVideo15Transformer3DModel: 54 blocks of 16 heads x 128, 65 input
channels; AutoencoderKLHunyuanVideo15) and sets only target_size (640 for 480p, 960 for 720p) and
task_type. Its scheduler shifts: 5.0 at 480p, 9.0 for 720p text-to-video, 7.0 for 720p
image-to-video; guidance 6.0. Text encoders: Qwen2.5-VL-7B-Instruct's language model and
google/byt5-small (the script loads both; the glyph tokens it adds to ByT5's vocabulary, and their
embedding rows, are not counted here). Image encoder: FLUX.1-Redux-dev's SigLIP vision model
(so400m-patch14-384, whose 27 x 27 patches are the 729 image tokens). Hub ids: the pipelines'
examples name hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v and -480p_i2v; the 720p ids follow
the same pattern. None of these configs is checked against the Hub's config.json here.
"""

from __future__ import annotations

from unison.engine.models.spec import Checkpoint, Component

QWEN_VL_7B_TEXT: Component = ("transformers", "Qwen2_5_VLTextModel", dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6))
BYT5_SMALL: Component = ("transformers", "T5EncoderModel", dict(
    vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6, feed_forward_proj="gated-gelu"))
SIGLIP_SO400M: Component = ("transformers", "SiglipVisionModel", dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
    patch_size=14))
# The class defaults the planner reads are spelled out (its fallbacks are other families').
VAE: Component = ("diffusers", "AutoencoderKLHunyuanVideo15", dict(
    latent_channels=32, spatial_compression_ratio=16, temporal_compression_ratio=4))

TARGET_SIZE = {"480p": 640, "720p": 960}
"""The transformer's target_size per resolution (pixels of the longer side its RoPE is scaled to)."""


def _transformer(size: str, task: str) -> Component:
    return ("diffusers", "HunyuanVideo15Transformer3DModel", dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54, patch_size=1,
        patch_size_t=1, target_size=TARGET_SIZE[size], task_type=task))


def _shape(size: str) -> tuple[tuple[str, object], ...]:
    return (("num_layers", 54), ("num_attention_heads", 16), ("in_channels", 65), ("target_size", TARGET_SIZE[size]))


T2V = tuple(
    Checkpoint(name=f"hunyuanvideo1.5-{size}", title=f"HunyuanVideo 1.5 T2V {size}",
               hub_ids=(f"hunyuanvideo-community/HunyuanVideo-1.5-{size}_t2v",),
               components={"transformer": _transformer(size, "t2v"), "text_encoder": QWEN_VL_7B_TEXT,
                           "text_encoder_2": BYT5_SMALL, "vae": VAE},
               shape=_shape(size), default=size == "480p",
               suite_case="HunyuanVideo 1.5" if size == "720p" else None)
    for size in ("480p", "720p"))
I2V = tuple(
    Checkpoint(name=f"hunyuanvideo1.5-i2v-{size}", title=f"HunyuanVideo 1.5 I2V {size}",
               hub_ids=(f"hunyuanvideo-community/HunyuanVideo-1.5-{size}_i2v",),
               components={"transformer": _transformer(size, "i2v"), "text_encoder": QWEN_VL_7B_TEXT,
                           "text_encoder_2": BYT5_SMALL, "image_encoder": SIGLIP_SO400M, "vae": VAE},
               shape=_shape(size), default=size == "480p")
    for size in ("480p", "720p"))
