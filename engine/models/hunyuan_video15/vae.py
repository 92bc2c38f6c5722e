"""How HunyuanVideo 1.5's VAE (AutoencoderKLHunyuanVideo15) decodes a tile, for parallel decode
(parallel/vae.py).

Its tiled decode sizes tiles its own way: latent tiles of `tile_latent_min_*` (set apart from the
pixel size, not derived from it) overlapping by `tile_overlap_factor` of a tile, that fraction of
`tile_sample_min_*` decoded pixels blended, and the joined tiles not cropped afterwards. A tile is the
decoder on its latents alone: no post-quant convolution, no folded pixels, no clamp, and every
latent frame in one call (the decoder is causal in time but keeps no cache and never chunks it)."""

from __future__ import annotations

from unison.parallel.vae import TileGeometry, VaeTiling


def _geometry(vae) -> TileGeometry:
    # The same float arithmetic as diffusers' tiled_decode, so that the integers agree.
    overlap = vae.tile_overlap_factor
    blend = (int(vae.tile_sample_min_height * overlap), int(vae.tile_sample_min_width * overlap))
    return TileGeometry(tile=(vae.tile_latent_min_height, vae.tile_latent_min_width),
                        stride=(int(vae.tile_latent_min_height * (1 - overlap)),
                                int(vae.tile_latent_min_width * (1 - overlap))),
                        blend=blend, keep=(vae.tile_sample_min_height - blend[0], vae.tile_sample_min_width - blend[1]),
                        crop=False)


HUNYUAN15_VAE = VaeTiling(name="HunyuanVideo 1.5's VAE (AutoencoderKLHunyuanVideo15)",
                          decode_tile=lambda vae, z, spatial: vae.decoder(z), geometry=_geometry)
