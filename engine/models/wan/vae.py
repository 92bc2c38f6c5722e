"""How Wan's VAE (AutoencoderKLWan) decodes a tile, for parallel decode (parallel/vae.py).

The Wan VAE is causal in time: each tile runs all its latent frames, in order, through the
decoder with a feature cache of its own, freshly cleared, exactly as diffusers' tiled decode does
(so tiles are never split in time). Wan 2.2's VAE decodes 2x2-patchified pixels, unfolded after
blending; the video is clamped to [-1, 1] as diffusers' decode clamps it."""

from __future__ import annotations

import torch

from unison.parallel.vae import VaeTiling


def _decode_tile(vae, z: torch.Tensor, spatial: bool) -> torch.Tensor:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    whole = vae.post_quant_conv(z) if not spatial else None  # the untiled path convolves once
    out = []
    for k in range(z.shape[2]):
        frame = whole[:, :, k:k + 1] if whole is not None else vae.post_quant_conv(z[:, :, k:k + 1])
        out.append(vae.decoder(frame, feat_cache=cache, feat_idx=[0], first_chunk=k == 0))
    return torch.cat(out, dim=2)


def _finish(vae, video: torch.Tensor) -> torch.Tensor:
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    if vae.config.patch_size:
        video = unpatchify(video, patch_size=vae.config.patch_size)
    return video.clamp_(-1.0, 1.0)


WAN_VAE = VaeTiling(name="Wan's VAE (AutoencoderKLWan)", decode_tile=_decode_tile,
                    pixel_patch=lambda vae: vae.config.patch_size or 1, finish=_finish)
