"""Invariant 2: N-rank final latents equal the one-rank run (Wan 2.1, Wan 2.2), gloo on the CPU."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from unison.engine.config import ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine


def _config(family: str, height: int, parallel: ParallelConfig) -> RunConfig:
    return RunConfig(
        model=ModelConfig(family=family),
        sampling=SamplingConfig(prompt="a dog runs on the beach", negative_prompt="blurred", height=height,
                                width=64, frames=9, steps=4, guidance=4.0, max_sequence_length=16),
        parallel=parallel, output=OutputConfig(decode=False, progress=False))


def _render(rank, world, family, height, parallel):
    result = Engine.from_config(_config(family, height, parallel), world_size=world).render()
    return result.latents, result.comm_bytes_per_step


def _one_rank(family: str, height: int) -> torch.Tensor:
    return Engine.from_config(_config(family, height, ParallelConfig())).render().latents


CASES = [
    # family, height (64: 48 tokens; 48: 27 tokens, which 2 and 4 do not divide), layout
    ("wan", 64, dict(ulysses=2)),
    ("wan", 48, dict(ulysses=4)),
    ("wan", 48, dict(ring=2)),
    ("wan", 64, dict(ring=4)),
    ("wan", 48, dict(ulysses=2, ring=2)),
    ("wan", 64, dict(cfg=2)),
    ("wan", 48, dict(cfg=2, ulysses=2)),
    ("wan2.2", 48, dict(ulysses=2)),
    ("wan2.2", 64, dict(cfg=2, ring=2)),
]


@pytest.mark.parametrize("family, height, layout", CASES,
                         ids=[f"{f}-{h}px-" + "x".join(f"{k}{v}" for k, v in l.items()) for f, h, l in CASES])
def test_n_ranks_equal_one_rank(family, height, layout):
    parallel = ParallelConfig(**layout, timeout_s=60)
    world = parallel.ulysses * parallel.ring * parallel.cfg
    reference = _one_rank(family, height)
    results = run_ranks(world, _render, family, height, parallel)
    for latents, comm in results:
        err = ((latents - reference).norm() / reference.norm()).item()
        assert err <= 1e-5, err
        assert comm, "a parallel run sent nothing"


def test_ulysses_counters_equal_analytic_bytes():
    """Ulysses 2 on the tiny Wan (48 tokens, 4 heads x 12, 3 blocks, CFG in batch of two branches).

    Per self-attention each rank sends half of its q, k, v and output shards (all-to-all), and
    per forward the final gather sends its (24 tokens x 48 channels) shard once.
    """
    parallel = ParallelConfig(ulysses=2, timeout_s=60)
    results = run_ranks(2, _render, "wan", 64, parallel)
    tokens, heads, dim, blocks, forwards, f32 = 24, 4, 12, 3, 2, 4
    all_to_all = forwards * blocks * 4 * (tokens * heads * dim * f32) // 2
    gather = forwards * tokens * heads * dim * f32
    for _, comm in results:
        assert comm == {"all_to_all": all_to_all, "all_gather": gather}
