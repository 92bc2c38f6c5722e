"""How HunyuanVideo's VAE (AutoencoderKLHunyuanVideo) decodes a tile, for parallel decode
(parallel/vae.py): a tile is decoded whole; long latents are also cut into overlapping temporal
chunks when the VAE's framewise decoding is on (its default), as diffusers' tiled decode does."""

from __future__ import annotations

from unison.parallel.vae import VaeTiling

HUNYUAN_VAE = VaeTiling(name="HunyuanVideo's VAE (AutoencoderKLHunyuanVideo)",
                        decode_tile=lambda vae, z, spatial: vae.decoder(vae.post_quant_conv(z)),
                        framewise=lambda vae: bool(vae.use_framewise_decoding))
