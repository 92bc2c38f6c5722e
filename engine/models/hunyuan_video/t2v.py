"""HunyuanVideo T2V (diffusers' HunyuanVideoPipeline): embedded guidance, optional true CFG."""

from __future__ import annotations

import numpy as np
import torch

from unison.engine import images, schedulers
from unison.engine.errors import UserError
from unison.engine.models.spec import Conditioning, Hooks, Limits
from unison.engine.models.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB, tiny_tokenizer


_TINY_IDS = dict(vocab_size=TINY_VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def tiny_vae():
    """The tiny presets' VAE (4 latent channels, 8x spatial and 4x temporal compression)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def tiny_llama_config():
    """The tiny presets' Llama text model: 16 wide, three layers."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_key_value_heads=4,
                       num_hidden_layers=3, max_position_embeddings=1024, **_TINY_IDS)


def tiny_text_encoder_2():
    """The tiny presets' CLIP text encoder (its pooled output is the transformer's pooled projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, projection_dim=8, max_position_embeddings=77,
                                        **_TINY_IDS))


def tiny_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaModel

    torch.manual_seed(seed)
    vae = tiny_vae()
    # Three layers, so that the pipeline's "third hidden state from the end" is a real layer output.
    text_encoder = LlamaModel(tiny_llama_config())
    text_encoder_2 = tiny_text_encoder_2()
    torch.manual_seed(seed + 1)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(bos=True, eos=False),
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(bos=True, eos=True),
    )


def check_guidance(sampling, *, family: str) -> None:
    """The scheduler and guidance settings HunyuanVideo (T2V and I2V) can take."""
    schedulers.check(sampling.scheduler, sampling.flow_shift, family=family, sigmas=True)
    if sampling.guidance_2 is not None:
        raise UserError(
            "--guidance-2 has no meaning for HunyuanVideo: it has one transformer; --guidance sets its "
            "embedded (distilled) guidance, and sampling.true_cfg_scale > 1 with a negative prompt adds true CFG"
        )
    if sampling.true_cfg_scale is not None and sampling.true_cfg_scale > 1 and sampling.negative_prompt is None:
        raise UserError(
            f"sampling.true_cfg_scale={sampling.true_cfg_scale} needs a negative prompt (--negative-prompt); "
            "without one HunyuanVideo runs embedded guidance only"
        )


class HunyuanHooks(Hooks):
    """HunyuanVideo text-to-video: embedded guidance on one branch, a second with true CFG."""

    family = "hunyuanvideo"

    def check_sampling(self, sampling) -> None:
        images.check_images(sampling, family=self.family, takes_image=False, needs_image=False, takes_last=False)
        check_guidance(sampling, family=self.family)

    def encode(self, pipe, sampling, device: torch.device) -> Conditioning:
        dtype = pipe.transformer.dtype

        def branch(prompt: str) -> dict[str, torch.Tensor]:
            embeds, pooled, mask = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, num_videos_per_prompt=1, device=device,
                max_sequence_length=sampling.max_sequence_length,
            )
            # Embedded guidance: the transformer takes the scale (x 1000) as an input on both branches.
            guidance = torch.tensor([sampling.guidance], dtype=dtype, device=device) * 1000.0
            return {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask.to(dtype),
                    "pooled_projections": pooled.to(dtype), "guidance": guidance}

        true_cfg = sampling.true_cfg_scale or 1.0
        do_true_cfg = self.branches(sampling) == 2
        return Conditioning(
            cond=branch(sampling.prompt),
            uncond=branch(sampling.negative_prompt) if do_true_cfg else None,
            scales=(true_cfg,),
        )

    def set_timesteps(self, pipe, steps: int, device: torch.device, sigmas=None) -> torch.Tensor:
        # HunyuanVideoPipeline passes explicit sigmas 1 -> 1/steps (a run's own replace them); the
        # scheduler shifts them.
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1] if sigmas is None else np.array(sigmas)
        pipe.scheduler.set_timesteps(sigmas=sigmas, device=device)
        pipe.scheduler.set_begin_index(0)
        return pipe.scheduler.timesteps

    def timestep_input(self, pipe, t: torch.Tensor, latents: torch.Tensor, conditioning) -> torch.Tensor:
        return t.expand(latents.shape[0]).to(latents.dtype)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]

    def branches(self, sampling) -> int:
        """Embedded guidance is one branch; true CFG (scale > 1 and a negative prompt) adds one."""
        return 2 if (sampling.true_cfg_scale or 1.0) > 1 and sampling.negative_prompt is not None else 1


def attention_modules(transformer) -> dict[str, list[torch.nn.Module]]:
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return {"self": [b.attn for b in blocks]}


PROMPT_TEMPLATE_TOKENS = 95
"""Tokens of the system prompt HunyuanVideoPipeline puts before the text and crops from the
Llama output (diffusers' DEFAULT_PROMPT_TEMPLATE crop_start; a test checks it)."""


def limits(read) -> Limits:
    """No video limit: diffusers' HunyuanVideoRotaryPosEmbed computes positions for any grid.
    The text goes through Llama with the prompt template in front, max_sequence_length +
    PROMPT_TEMPLATE_TOKENS positions, which its max_position_embeddings bounds."""
    positions = read("text_encoder/config.json").get("max_position_embeddings")
    return text_limits(positions, PROMPT_TEMPLATE_TOKENS, "the Llama text encoder",
                       f"the {PROMPT_TEMPLATE_TOKENS}-token prompt template")


def text_limits(positions, reserved: int, model: str, what: str) -> Limits:
    """The text tokens a Llama with `positions` positions leaves after `reserved` of them (the
    prompt template's, `what`); no limit when the config names none."""
    if not isinstance(positions, int) or positions <= reserved:
        return Limits()
    return Limits(text_tokens=positions - reserved,
                  text_source=f"{model}'s max_position_embeddings {positions} less {what}")
