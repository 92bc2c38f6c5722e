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


def latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and the reciprocal of its std, (1, channels, 1, 1, 1) on `device` in
    `dtype`: diffusers normalises by multiplying with the reciprocal (and denormalises by dividing
    by it), which these reproduce bit for bit."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, inv_std


def decode_stream(vae, pieces):
    """Whole-video decode, a piece of latent frames at a time: the causal decoder's feature cache is
    carried from one piece to the next, so each piece's pixels are exactly what a decode of the whole
    video gives for those frames (diffusers' untiled decode runs the same calls frame by frame), and
    only one piece's pixels exist at a time. `pieces`: normalised latents (the loop's), in order."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    started = False
    for latents in pieces:
        latents = latents.to(vae.device, dtype=vae.dtype)
        mean, inv_std = latent_stats(vae, latents.device, latents.dtype)
        z = vae.post_quant_conv(latents / inv_std + mean)  # one frame at a time (a 1x1x1 convolution)
        out = []
        for k in range(z.shape[2]):
            out.append(vae.decoder(z[:, :, k:k + 1], feat_cache=cache, feat_idx=[0], first_chunk=not started))
            started = True
        yield _finish(vae, torch.cat(out, dim=2))


WAN_VAE = VaeTiling(name="Wan's VAE (AutoencoderKLWan)", decode_tile=_decode_tile,
                    pixel_patch=lambda vae: vae.config.patch_size or 1, finish=_finish)
