"""Wan 2.1 T2V, Wan 2.2 A14B (two experts) and Wan 2.2 TI2V-5B, all served by diffusers' WanPipeline.

The three share every function; they differ in the folder's model_index.json
(`transformer_2` + `boundary_ratio` for A14B, `expand_timesteps` for TI2V-5B), their VAE
and their defaults.
"""

from __future__ import annotations

from typing import Any

import torch

from unison.errors import UserError
from unison.engine.models.wan_parallel import pipefusion_plan, sequence_parallel_plan
from unison.engine.models.base import Conditioning, Limits, ModelSpec, SamplingDefaults
from unison.engine.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB, tiny_tokenizer


def _variant(index: dict[str, Any]) -> str | None:
    if index.get("_class_name") != "WanPipeline":
        return None
    second = index.get("transformer_2")
    has_second = isinstance(second, list) and second[0] is not None
    if has_second and index.get("boundary_ratio") is not None:
        return "wan2.2"
    if index.get("expand_timesteps"):
        return "wan2.2-ti2v"
    return "wan"


def _tiny_transformer(seed: int, *, channels: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12,
        in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=64,
        num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _tiny_pipeline(seed: int, *, variant: str):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    ti2v = variant == "wan2.2-ti2v"
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
    channels = 48 if ti2v else 16
    transformer = _tiny_transformer(seed + 1, channels=channels)
    transformer_2 = _tiny_transformer(seed + 2, channels=channels) if variant == "wan2.2" else None
    return WanPipeline(
        tokenizer=tiny_tokenizer(bos=False, eos=True), text_encoder=text_encoder, vae=vae,
        scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=0.875 if variant == "wan2.2" else None, expand_timesteps=ti2v,
    )


def _check_sampling(family: str):
    def check(sampling) -> None:
        if sampling.true_cfg_scale is not None:
            raise UserError(
                f"sampling.true_cfg_scale is HunyuanVideo's; {family} runs classifier-free guidance "
                "with --guidance (CFG is on when it is > 1)"
            )
        if sampling.guidance_2 is not None and family != "wan2.2":
            raise UserError(
                f"--guidance-2 is the low-noise expert's guidance of Wan 2.2 A14B; {family} has one "
                "transformer, so use --guidance alone"
            )
    return check


def _encode(pipe, sampling, device: torch.device) -> Conditioning:
    do_cfg = sampling.guidance > 1.0
    cond, uncond = pipe.encode_prompt(
        prompt=sampling.prompt, negative_prompt=sampling.negative_prompt,
        do_classifier_free_guidance=do_cfg, num_videos_per_prompt=1,
        max_sequence_length=sampling.max_sequence_length, device=device,
    )
    dtype = (pipe.transformer or pipe.transformer_2).dtype
    scales = (sampling.guidance,)
    if pipe.config.boundary_ratio is not None:
        scales += (sampling.guidance if sampling.guidance_2 is None else sampling.guidance_2,)
    return Conditioning(
        cond={"encoder_hidden_states": cond.to(dtype)},
        uncond={"encoder_hidden_states": uncond.to(dtype)} if do_cfg else None,
        scales=scales,
    )


def _set_timesteps(pipe, steps: int, device: torch.device) -> torch.Tensor:
    pipe.scheduler.set_timesteps(steps, device=device)
    pipe.scheduler.set_begin_index(0)
    return pipe.scheduler.timesteps


def _timestep_input(pipe, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    if pipe.config.expand_timesteps:
        # TI2V-5B: one timestep per latent token (all equal for text-to-video), as diffusers builds it.
        mask = torch.ones(latents.shape, dtype=torch.float32, device=latents.device)
        per_token = (mask[0][0][:, ::2, ::2] * t).flatten()
        return per_token.unsqueeze(0).expand(latents.shape[0], -1)
    return t.expand(latents.shape[0])


def _expert_boundary(pipe) -> float | None:
    if pipe.config.boundary_ratio is None:
        return None
    return pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    latents = latents.to(vae.device, dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    # diffusers divides by the reciprocal of std; do the same so decoded frames match bit for bit.
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0]


WAN_TEXT_TOKENS = 512
"""The text length Wan's transformers were trained with (umT5 text, padded to 512: Wan's
text_len, diffusers' WanPipeline default max_sequence_length)."""


def _limits(read) -> Limits:
    """Wan's RoPE table (diffusers' WanRotaryPosEmbed) holds rope_max_seq_len positions per latent
    axis and is sliced by the patches along frames, height and width: past it the slice comes up
    short and the forward fails. The text is umT5's, padded to max_sequence_length: the
    tokenizer's model_max_length where it names one, else Wan's 512."""
    vae = read("vae/config.json")
    spatial, temporal = int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))
    experts = [cfg for cfg in (read("transformer/config.json"), read("transformer_2/config.json")) if cfg]
    rope = min(int(cfg.get("rope_max_seq_len", 1024)) for cfg in experts) if experts else 1024
    pt, ph, pw = (int(p) for p in (experts[0] if experts else {}).get("patch_size", (1, 2, 2)))
    text = read("tokenizer/tokenizer_config.json").get("model_max_length")
    named = isinstance(text, int) and 0 < text <= 10**6  # transformers writes ~1e30 for "no limit"
    # Latent frames (frames - 1) / temporal + 1, in patches of pt, at most rope of them.
    return Limits(
        frames=(rope * pt + pt - 2) * temporal + 1, height=rope * ph * spatial, width=rope * pw * spatial,
        video_source=f"the transformer's rope_max_seq_len, {rope} positions per axis; "
                     f"{ph * spatial} pixels and {pt * temporal} frames per position",
        text_tokens=text if named else WAN_TEXT_TOKENS,
        text_source="the tokenizer's model_max_length" if named else "the text length Wan was trained with",
    )


def _attention_modules(transformer) -> dict[str, list[torch.nn.Module]]:
    return {"self": [b.attn1 for b in transformer.blocks], "cross": [b.attn2 for b in transformer.blocks]}


def _tiny_configs(family: str) -> dict[str, dict]:
    """The tiny preset's config values that _limits reads (as _tiny_pipeline builds them)."""
    spatial = 16 if family == "wan2.2-ti2v" else 8
    transformer = {"rope_max_seq_len": 32, "patch_size": [1, 2, 2]}
    configs = {"transformer/config.json": transformer,
               "vae/config.json": {"scale_factor_spatial": spatial, "scale_factor_temporal": 4}}
    if family == "wan2.2":
        configs["transformer_2/config.json"] = transformer
    return configs


def _spec(family: str, title: str, *, experts, defaults, tiny_defaults, size_multiple=16, fps=16,
          notes=()) -> ModelSpec:
    return ModelSpec(
        family=family, title=title, pipeline_class="WanPipeline",
        transformer_class="WanTransformer3DModel", experts=experts, fps=fps,
        size_multiple=size_multiple, temporal_factor=4, embedded_guidance=False,
        block_lists=("blocks",), defaults=defaults, tiny_defaults=tiny_defaults,
        matches=lambda index: _variant(index) == family,
        build_tiny=lambda seed: _tiny_pipeline(seed, variant=family),
        check_sampling=_check_sampling(family), encode=_encode, set_timesteps=_set_timesteps,
        timestep_input=_timestep_input, expert_boundary=_expert_boundary, decode=_decode,
        sequence_parallel_plan=sequence_parallel_plan, displaced_patches=True, pipefusion_plan=pipefusion_plan,
        attention_modules=_attention_modules, limits=_limits, tiny_configs=_tiny_configs(family),
        notes=notes,
    )


_TINY = SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0, max_sequence_length=32)

WAN21 = _spec(
    "wan", "Wan 2.1 T2V (1.3B, 14B)", experts=("transformer",),
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=50, guidance=5.0,
                              max_sequence_length=512),
    tiny_defaults=_TINY,
)

WAN22 = _spec(
    "wan2.2", "Wan 2.2 T2V A14B (two experts)", experts=("transformer", "transformer_2"),
    defaults=SamplingDefaults(height=480, width=832, frames=81, steps=40, guidance=4.0,
                              guidance_2=3.0, max_sequence_length=512),
    tiny_defaults=SamplingDefaults(height=64, width=64, frames=9, steps=6, guidance=5.0,
                                   guidance_2=3.0, max_sequence_length=32),
    notes=("the expert boundary is boundary_ratio × num_train_timesteps from the folder",),
)

WAN22_TI2V = _spec(
    "wan2.2-ti2v", "Wan 2.2 TI2V-5B (text-to-video)", experts=("transformer",), size_multiple=32,
    fps=24,
    defaults=SamplingDefaults(height=704, width=1280, frames=121, steps=50, guidance=5.0,
                              max_sequence_length=512),
    tiny_defaults=_TINY,
    notes=("text-to-video only; image conditioning is not in yet",),
)

SPECS = (WAN21, WAN22, WAN22_TI2V)
