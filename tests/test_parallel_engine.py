"""Invariant 2: N-rank final latents equal the one-rank run (Wan 2.1, Wan 2.2, HunyuanVideo), gloo on the CPU."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from unison.engine.config import ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine
from unison.parallel.cost import TransformerShape, bytes_per_step


def _config(family: str, height: int, parallel: ParallelConfig) -> RunConfig:
    # HunyuanVideo runs true CFG (two branches, so CFG parallel applies) besides embedded guidance;
    # at 128 text tokens its prompts (111 and 105 tokens after the template crop, with the tiny
    # tokenizer) leave padding that joint attention must mask.
    hunyuan = family == "hunyuanvideo"
    return RunConfig(
        model=ModelConfig(family=family),
        sampling=SamplingConfig(prompt="a dog runs on the beach", negative_prompt="blurred", height=height,
                                width=height if hunyuan else 64, frames=9, steps=3 if hunyuan else 4,
                                guidance=4.0, true_cfg_scale=3.0 if hunyuan else None, max_sequence_length=128 if hunyuan else 16),
        parallel=parallel, output=OutputConfig(decode=False, progress=False))


def _render(rank, world, family, height, parallel):
    result = Engine.from_config(_config(family, height, parallel), world_size=world).render()
    return result.latents, result.comm_bytes_per_step


def _one_rank(family: str, height: int) -> torch.Tensor:
    return Engine.from_config(_config(family, height, ParallelConfig())).render().latents


# Every family in every layout the issue names. Height 64 gives 48 video tokens; height 48 gives
# 27 (Wan: 3x3x3 at width 64; HunyuanVideo: 3x3x3 at 48x48), which neither 2 nor 4 divides.
LAYOUTS = [
    (64, dict(ulysses=2)),
    (48, dict(ulysses=4)),
    (48, dict(ring=2)),
    (64, dict(ring=4)),
    (48, dict(ulysses=2, ring=2)),
    (64, dict(cfg=2)),
    (48, dict(cfg=2, ulysses=2)),
]
CASES = [(family, height, layout) for family in ("wan", "wan2.2", "hunyuanvideo") for height, layout in LAYOUTS]


def _tiny_shape(family: str, latents: torch.Tensor) -> TransformerShape:
    """The tiny presets' shapes: Wan 4 heads x 12, 3 blocks, patches 1x2x2; HunyuanVideo 4 heads
    x 10, 2 dual- + 2 single-stream blocks, patches 1x2x2, 128 text tokens in joint attention."""
    _, _, frames, height, width = latents.shape
    tokens = frames * (height // 2) * (width // 2)
    if family == "hunyuanvideo":
        return TransformerShape(video_tokens=tokens, heads=4, head_dim=10, attentions=4,
                                latent_elements=latents.numel(), joint_text_tokens=128)
    return TransformerShape(video_tokens=tokens, heads=4, head_dim=12, attentions=3, latent_elements=latents.numel())


@pytest.mark.parametrize("family, height, layout", CASES,
                         ids=[f"{f}-{h}px-" + "x".join(f"{k}{v}" for k, v in l.items()) for f, h, l in CASES])
def test_n_ranks_equal_one_rank(family, height, layout):
    parallel = ParallelConfig(**layout, timeout_s=60)
    world = parallel.ulysses * parallel.ring * parallel.cfg
    reference = _one_rank(family, height)
    results = run_ranks(world, _render, family, height, parallel)
    # Communication equals the analytic count (two guidance branches per step, float32).
    expected = bytes_per_step(_tiny_shape(family, reference), **layout, branches=2, element_bytes=4)
    for latents, comm in results:
        err = ((latents - reference).norm() / reference.norm()).item()
        assert err <= 1e-5, err
        assert comm == expected


def test_analytic_count_by_hand():
    """bytes_per_step (checked against the engine's counters above) against hand arithmetic.

    Tiny Wan, Ulysses 2, 48 tokens, 4 heads x 12, 3 blocks, two branches, float32: per
    self-attention each rank sends half of its q, k, v and output shards (24 tokens x 48
    channels) by all-to-all; per forward the final gather sends its shard once.
    Tiny HunyuanVideo adds, per joint attention, its two heads of the 128-token text output.
    """
    tokens, heads, f32 = 24, 4, 4
    wan = TransformerShape(video_tokens=48, heads=4, head_dim=12, attentions=3, latent_elements=3072)
    assert bytes_per_step(wan, ulysses=2, branches=2, element_bytes=4) == {
        "all_to_all": 2 * 3 * 4 * (tokens * heads * 12 * f32) // 2,
        "all_gather": 2 * tokens * heads * 12 * f32,
    }
    hunyuan = TransformerShape(video_tokens=48, heads=4, head_dim=10, attentions=4, latent_elements=768,
                               joint_text_tokens=128)
    assert bytes_per_step(hunyuan, ulysses=2, branches=2, element_bytes=4) == {
        "all_to_all": 2 * 4 * 4 * (tokens * heads * 10 * f32) // 2,
        "all_gather": 2 * 4 * 128 * 2 * 10 * f32 + 2 * tokens * heads * 10 * f32,
    }
    # Ring 2 x cfg 2: one forward per rank; K and V shards pass once per attention; the
    # prediction (768 elements) is exchanged once.
    assert bytes_per_step(hunyuan, ring=2, cfg=2, branches=2, element_bytes=4) == {
        "ring_p2p": 4 * 2 * tokens * heads * 10 * f32,
        "all_gather": tokens * heads * 10 * f32 + 768 * f32,
    }


# ---------------------------------------------------------------------------------------------
# The registry's battery: every family (a new one with no edit here) under every two-rank mode.

BATTERY_LAYOUTS = [dict(ulysses=2), dict(ring=2), dict(cfg=2), dict(patch=2),
                   dict(patch=2, patch_mode="pipefusion"), dict(ulysses=2, shard_weights=True)]
"""Patch modes run only warm-up steps (the default 4 > the 3 steps), where they are exact."""


def _battery_config(family: str, folder, parallel: ParallelConfig) -> RunConfig:
    import dataclasses

    import families
    from unison.engine.models import get_spec

    sampling = families.sampling(family, steps=3, folder=folder)
    if get_spec(family).size_multiple <= 16:  # 3 x 3 x 3 = 27 video tokens: no degree divides them
        sampling = dataclasses.replace(sampling, height=48, width=48)
    return RunConfig(model=ModelConfig(family=family), sampling=sampling, parallel=parallel,
                     output=OutputConfig(decode=False, progress=False))


def _battery(rank, world, family, folder):
    out = []
    for layout in BATTERY_LAYOUTS:
        config = _battery_config(family, folder, ParallelConfig(**layout, timeout_s=60))
        out.append(Engine.from_config(config, world_size=world).render().latents)
    return out


@pytest.mark.parametrize("family", sorted(__import__("unison.engine.models", fromlist=["SPECS"]).SPECS))
def test_every_family_on_two_ranks_equals_one_rank(family, tmp_path):
    """Ulysses and Ring at a token count 2 does not divide, CFG parallel, displaced patches and
    PipeFusion in their exact warm-up, FSDP2-sharded weights: each equals the one-rank render."""
    reference = Engine.from_config(_battery_config(family, tmp_path, ParallelConfig())).render().latents
    for rank_results in run_ranks(2, _battery, family, tmp_path):
        for layout, latents in zip(BATTERY_LAYOUTS, rank_results):
            err = ((latents - reference).norm() / reference.norm()).item()
            assert err <= 1e-5, (layout, err)
