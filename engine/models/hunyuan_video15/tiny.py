"""HunyuanVideo 1.5's tiny random-weight preset, built in-process and offline: a tiny Qwen2.5-VL
text model with a byte-level tokenizer that carries a chat template, a tiny T5 encoder for the
glyph text with ByT5's byte tokenizer (it needs no files), and tiny transformer and VAE."""

from __future__ import annotations

import torch

from unison.engine.models.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A chat template of Qwen's shape (the pipeline formats a system and a user message)."""


TINY_TARGET_SIZE = 32
"""The tiny transformer's target_size: image-to-video sizes the video from it and the picture's
aspect (4-pixel buckets of the tiny VAE; a 96 x 30 picture gets 16 x 48)."""


def _tiny_siglip():
    """A tiny SigLIP vision tower (28-pixel input, 14-pixel patches: 4 image tokens of width 12)
    and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14))
    return vision, SiglipImageProcessor(size={"height": 28, "width": 28})


def tiny_pipeline(seed: int, *, i2v: bool = False):
    import diffusers
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=4,
                                      downsample_match_channel=False, upsample_match_channel=False)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=TINY_VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                             relative_attention_num_buckets=8))
    torch.manual_seed(seed + 1)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=4,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=TINY_TARGET_SIZE, task_type="i2v" if i2v else "t2v")
    tokenizer = tiny_tokenizer(bos=False, eos=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    parts = dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                 text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                 tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=6.0))
    if i2v:
        torch.manual_seed(seed + 2)
        parts["image_encoder"], parts["feature_extractor"] = _tiny_siglip()
        return diffusers.HunyuanVideo15ImageToVideoPipeline(**parts)
    return diffusers.HunyuanVideo15Pipeline(**parts)
