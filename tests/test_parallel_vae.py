"""Parallel VAE decode: on 1, 2 and 3 gloo ranks it equals diffusers' one-rank tiled decode
(`vae.enable_tiling(); vae.decode(z)`) for the Wan 2.1, Wan 2.2 (patchified), HunyuanVideo and
HunyuanVideo 1.5 VAEs, with tiles that really split (rows, columns and HunyuanVideo's temporal
chunks; HunyuanVideo 1.5's own tile sizes, joined uncropped); the engine decodes on every rank and
writes on rank 0; an unsupported VAE is a clear error."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from multirank import run_ranks
from unison.parallel.comm import CommStats
from unison.parallel.vae import ParallelVAE, parallel_decode, plan_tiles

TOLERANCE = 1e-6
"""Relative error (max |diff| / max |reference|); on the CPU the outputs are in fact identical."""

# Latents per case: Wan 3 latent frames (9 video frames), HunyuanVideo 6 (21 frames, two temporal
# chunks of its framewise decoding), HunyuanVideo 1.5 4 (7 frames, in one call). 12x14 latent
# pixels make a 2x3 tile grid at these tile sizes.
SHAPES = {"wan": (1, 16, 3, 12, 14), "wan2.2": (1, 48, 2, 6, 7), "hunyuan": (1, 4, 6, 12, 14),
          "hunyuan1.5": (1, 4, 4, 12, 14)}


def _vae(case: str):
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15, AutoencoderKLWan

    torch.manual_seed(0)
    if case == "hunyuan1.5":  # the tiny VAE of engine/models/hunyuan_video15/tiny.py (4x spatial)
        vae = AutoencoderKLHunyuanVideo15(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
            spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
            upsample_match_channel=False)
        # Its tiling takes the latent tile apart from the pixel one, and no stride: tiles 6 latent
        # pixels apart (a quarter overlap), 8 decoded pixels blended, 24 kept.
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_latent_min_height=8,
                          tile_latent_min_width=8)
        return vae.eval()
    if case == "wan":  # the tiny Wan 2.1 VAE of engine/models/wan/hooks.py
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    elif case == "wan2.2":  # Wan 2.2 TI2V: 2x2 patchified pixels, 16x spatial compression
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    else:  # the tiny HunyuanVideo VAE of engine/models/hunyuan_video/t2v.py
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True)
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64,
                      tile_sample_stride_height=48, tile_sample_stride_width=48)
    return vae.eval()


def _tiling(case: str):
    """The family's declared tiling of the VAE `_vae(case)` builds."""
    from unison.engine.models import get_spec

    return get_spec({"wan": "wan", "wan2.2": "wan2.2-ti2v", "hunyuan": "hunyuanvideo",
                     "hunyuan1.5": "hunyuanvideo1.5"}[case]).vae_tiling


def _latents(case: str) -> torch.Tensor:
    return torch.randn(SHAPES[case], generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _decode_cases(rank: int, world: int, cases: list[str]):
    """Every rank decodes in parallel; rank 0 also decodes the reference, one-rank and tiled."""
    out = {}
    for case in cases:
        vae, z = _vae(case), _latents(case)
        stats = CommStats()
        video = parallel_decode(vae, z, tiling=_tiling(case), group=torch.distributed.group.WORLD, stats=stats)
        plan = plan_tiles(vae, z.shape, _tiling(case))
        mine = [i for i, o in enumerate(plan.owners(world)) if o == rank]
        if rank != 0:
            out[case] = (video, stats.bytes_sent["vae_gather"], stats.calls["vae_gather"], mine)
            continue
        with torch.no_grad():
            reference = vae.decode(z).sample
        out[case] = (_rel(video, reference), torch.equal(video, reference), video.shape == reference.shape, mine)
    return out


@pytest.mark.parametrize("world,cases", [(2, ["wan", "wan2.2", "hunyuan", "hunyuan1.5"]), (3, ["wan", "hunyuan"])])
def test_parallel_decode_equals_one_rank_tiled_decode(world, cases):
    results = run_ranks(world, _decode_cases, cases)
    for case in cases:
        plan = plan_tiles(_vae(case), SHAPES[case], _tiling(case))
        assert plan.spatial and plan.grid[0] > 1 and plan.grid[1] > 1, plan.grid
        error, equal, same_shape, _ = results[0][case]
        assert same_shape and error <= TOLERANCE, (case, error)
        assert equal, f"{case}: expected bit-identical output on the CPU, relative error {error:.2e}"
        # Every rank got tiles, in contiguous runs; the others sent exactly theirs and returned None.
        owned = [results[r][case][-1] for r in range(world)]
        assert all(owned) and sum(owned, []) == list(range(len(plan.tiles)))
        for r in range(1, world):
            video, nbytes, calls, mine = results[r][case]
            assert video is None and calls == len(mine) and nbytes > 0
    assert plan_tiles(_vae("hunyuan"), SHAPES["hunyuan"], _tiling("hunyuan")).chunks == 2
    if world == 3:  # an uneven split: 6 Wan tiles as 1 + 2 + 3 by latent volume
        assert [len(results[r]["wan"][-1]) for r in range(3)] == [1, 2, 3]


def test_one_rank_without_group_equals_tiled_decode():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny convolutions are far slower with threads on a busy machine
    try:
        for case, shape in [("wan2.2", SHAPES["wan2.2"]), ("hunyuan", (1, 4, 7, 6, 7)), ("wan", (1, 16, 2, 6, 7)),
                            ("hunyuan1.5", (1, 4, 3, 6, 7))]:
            vae = _vae(case)
            z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                reference = vae.decode(z).sample
            video = ParallelVAE(vae, tiling=_tiling(case), group=None).decode(z, return_dict=False)[0]
            assert _rel(video, reference) <= TOLERANCE and torch.equal(video, reference), case
        # Those cover the patchified grid, temporal chunks of whole frames (no spatial tiling),
        # and Wan and HunyuanVideo 1.5 frames small enough for one tile (diffusers' untiled path).
        assert plan_tiles(_vae("hunyuan"), (1, 4, 7, 6, 7), _tiling("hunyuan")).chunks == 3
        assert not plan_tiles(_vae("wan"), (1, 16, 2, 6, 7), _tiling("wan")).spatial
        assert not plan_tiles(_vae("hunyuan1.5"), (1, 4, 3, 6, 7), _tiling("hunyuan1.5")).spatial
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sample", [48, 24])
def test_tiles_joined_uncropped_keep_diffusers_length(sample):
    """HunyuanVideo 1.5's decode joins what each tile keeps without cropping to the latent size:
    with pixel tiles larger (48) or smaller (24) than the 8-latent tiles decode to (32), its video
    is longer or shorter than 4x the latents, and parallel decode's is the same."""
    vae = _vae("hunyuan1.5")
    vae.enable_tiling(tile_sample_min_height=sample, tile_sample_min_width=sample)
    z = torch.randn((1, 4, 2, 12, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = vae.decode(z).sample
    video = parallel_decode(vae, z, tiling=_tiling("hunyuan1.5"), group=None)
    assert reference.shape[-2:] != (48, 56) and video.shape == reference.shape, (video.shape, reference.shape)
    assert torch.equal(video, reference)


def test_tile_owners_are_contiguous_and_cover_every_tile():
    plan = plan_tiles(_vae("hunyuan"), (1, 4, 6, 40, 40), _tiling("hunyuan"))  # 7x7 tiles x 2 chunks
    for n in (1, 2, 3, 4, 8):
        owners = plan.owners(n)
        assert owners == sorted(owners) and set(owners) == set(range(n))
        load = [sum(t.cost for t, o in zip(plan.tiles, owners) if o == r) for r in range(n)]
        assert max(load) <= sum(load) / n + max(t.cost for t in plan.tiles)
    assert plan.owners(200) == sorted(plan.owners(200))  # fewer tiles than ranks: some ranks idle
    assert plan_tiles(_vae("wan"), (1, 16, 2, 6, 7), _tiling("wan")).owners(4) == [0]  # one tile: rank 0, no transfer


def test_latents_of_the_wrong_rank_are_a_clear_error():
    with pytest.raises(ValueError, match="expected latents"):
        plan_tiles(_vae("wan"), (1, 16, 8, 8), _tiling("wan"))


def _engine_decode(rank: int, world: int, video_path: str):
    from test_parallel_engine import _config
    from unison.engine.config import OutputConfig, ParallelConfig
    from unison.engine.render import Engine

    config = _config("wan", 64, ParallelConfig(ulysses=world, timeout_s=60))
    config = dataclasses.replace(config, output=OutputConfig(path=video_path, progress=False))
    engine = Engine.from_config(config, world_size=world)
    engine.pipe.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                                  tile_sample_stride_height=24, tile_sample_stride_width=24)
    result = engine.render()  # decodes on every rank, writes on rank 0
    return result.latents, engine.decode(result.latents), result.video_path, "decode" in result.seconds


def test_engine_decodes_on_every_rank_and_writes_on_rank_0(tmp_path):
    from test_parallel_engine import _config
    from unison.engine.config import OutputConfig, ParallelConfig
    from unison.engine.render import Engine

    (latents, frames, path, timed), (_, other_frames, other_path, other_timed) = run_ranks(
        2, _engine_decode, str(tmp_path / "v.mp4"))
    assert path is not None and path.exists() and timed and other_timed
    assert other_frames is None and other_path is None
    one = Engine.from_config(dataclasses.replace(_config("wan", 64, ParallelConfig()),
                                                 output=OutputConfig(vae_tiling=True, progress=False)))
    one.pipe.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                               tile_sample_stride_height=24, tile_sample_stride_width=24)
    assert plan_tiles(one.pipe.vae, latents.shape, _tiling("wan")).grid == (3, 3)
    reference = one.decode(latents)
    assert frames.dtype == reference.dtype == np.uint8 and frames.shape == reference.shape == (9, 64, 64, 3)
    assert (frames == reference).all()


def test_the_spec_declares_parallel_decode_and_the_plan_checks_it(monkeypatch):
    """Every family that declares it (ModelSpec.vae_tiling) decodes its tiny VAE's latents through
    its own decode hook, tiles spread by parallel decode (one rank here), exactly as the VAE's own
    tiled decode; a family that does not is refused at plan time under output.parallel_decode,
    not after its denoising, and plans with parallel_decode off."""
    import dataclasses

    from unison.engine import plan as build
    from unison.engine.config import OutputConfig, ParallelConfig, RunConfig
    from unison.engine.config import ModelConfig as Model
    from unison.engine.models import SPECS, get_spec
    from unison.engine.errors import UserError
    from unison.parallel.vae import ParallelVAE

    for family, spec in SPECS.items():
        if spec.vae_tiling is None:
            continue
        vae = spec.build_tiny(0).vae.eval()
        # 32-pixel tiles 24 apart, in the sizes its enable_tiling takes (some VAEs size the latent
        # tile apart from the pixel one, and the stride by an overlap factor of a quarter).
        ratio = vae.spatial_compression_ratio
        sizes = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                     tile_sample_stride_width=24, tile_latent_min_height=32 // ratio, tile_latent_min_width=32 // ratio)
        accepted = inspect.signature(vae.enable_tiling).parameters
        vae.enable_tiling(**{name: size for name, size in sizes.items() if name in accepted})
        channels = getattr(vae.config, "z_dim", None) or vae.config.latent_channels
        side = max(6, 32 // ratio + 4)  # latent pixels: more than one 32-pixel tile
        z = torch.randn(1, channels, 2, side, side, generator=torch.Generator().manual_seed(3))
        plan = plan_tiles(vae, z.shape, spec.vae_tiling)
        assert plan.spatial and min(plan.grid) > 1, (family, plan.grid)
        with torch.no_grad():
            reference = spec.hooks.decode(vae, z)
            video = spec.hooks.decode(ParallelVAE(vae, tiling=spec.vae_tiling, group=None), z)
        assert video.shape == reference.shape and torch.equal(video, reference), family
    undeclared = dataclasses.replace(get_spec("wan"), vae_tiling=None)
    monkeypatch.setattr(build, "get_spec", lambda family: undeclared)
    config = RunConfig(model=Model(family="wan"), parallel=ParallelConfig(ulysses=2))
    with pytest.raises(UserError, match="output.parallel_decode: Wan 2.1 T2V .*VAE decode cannot be spread"):
        build.plan_run(config, world_size=2)
    build.plan_run(dataclasses.replace(config, output=OutputConfig(parallel_decode=False)), world_size=2)
