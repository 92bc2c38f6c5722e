"""Attention-level parity: Ulysses, Ring and USP shards equal one-rank SDPA, uneven lengths included."""

from __future__ import annotations

import torch
import torch.distributed as dist

from multirank import run_ranks
from unison.parallel.attention import AttentionGroups, parallel_attention, sdpa
from unison.parallel.comm import CommStats
from unison.parallel.dims import ParallelDims, build_groups
from unison.parallel.sequence import SequenceShard

# (ulysses, ring, cfg filler) on 4 ranks; the cfg axis only fills the world when sp < 4.
LAYOUTS = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]
SHAPES = [(1, 48, 4, 8), (2, 37, 4, 16), (1, 5, 8, 8), (1, 130, 4, 4)]


def _attention_case(rank, world):
    results = []
    for ulysses, ring, cfg in LAYOUTS:
        dims = ParallelDims(cfg=cfg, ring=ring, ulysses=ulysses, world_size=world)
        groups = build_groups(dims, rank=rank, timeout_s=60)
        stats = CommStats()
        attn = AttentionGroups(ulysses=groups.get("ulysses"), ulysses_size=ulysses, ring=groups.get("ring"),
                               ring_size=ring, ring_index=groups.index("ring"), stats=stats)
        shard = SequenceShard(attention=attn, group=groups.get("sp"), size=dims.sp, index=groups.index("sp"),
                              stats=stats)
        for shape in SHAPES:
            g = torch.Generator().manual_seed(sum(shape))
            q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
            local = [shard.split(t, dim=1, record=True) for t in (q, k, v)]
            out = shard.gather(parallel_attention(*local, groups=attn, valid_len=shard.valid_len), dim=1)
            ref = sdpa(q, k, v)
            err = ((out - ref).norm() / ref.norm()).item()
            results.append(((ulysses, ring), shape, err))
        dist.barrier()
    return results


def test_ulysses_ring_usp_match_sdpa():
    per_rank = run_ranks(4, _attention_case)
    for results in per_rank:
        for layout, shape, err in results:
            assert err <= 1e-5, (layout, shape, err)
    assert len(per_rank[0]) == len(LAYOUTS) * len(SHAPES)
