"""Attention-level parity: Ulysses, Ring and USP shards equal one-rank SDPA, uneven lengths included,
for plain self-attention (Wan) and for joint video+text attention with padded text (HunyuanVideo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from multirank import run_ranks
from unison.parallel.attention import AttentionGroups, parallel_attention, parallel_joint_attention, sdpa
from unison.parallel.comm import CommStats
from unison.parallel.dims import ParallelDims, build_groups
from unison.parallel.sequence import SequenceShard

# (ulysses, ring, cfg filler) on 4 ranks; the cfg axis only fills the world when sp < 4.
LAYOUTS = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]
SHAPES = [(1, 48, 4, 8), (2, 37, 4, 16), (1, 5, 8, 8), (1, 130, 4, 4)]


def _attention_case(rank, world):
    results, texts, meshes = [], [], []
    for ulysses, ring, cfg in LAYOUTS:
        dims = ParallelDims(cfg=cfg, ring=ring, ulysses=ulysses, world_size=world)
        groups = build_groups(dims, rank=rank, timeout_s=60)
        active = tuple(a for a in ("cfg", "ring", "ulysses") if getattr(dims, a) > 1)
        meshes.append((groups.mesh.mesh_dim_names == active,
                       all(groups.mesh[a].get_group() is groups.get(a) for a in active)))
        stats = CommStats()
        attn = AttentionGroups(ulysses=groups.get("ulysses"), ulysses_size=ulysses, ring=groups.get("ring"),
                               ring_size=ring, ring_index=groups.index("ring"),
                               ulysses_index=groups.index("ulysses"), stats=stats)
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
            # Joint: 7 text tokens of which the first 5 are real; one rank masks the other 2 as keys.
            text = [torch.randn(shape[0], 7, *shape[2:], generator=g) for _ in range(3)]
            video_out, text_out = parallel_joint_attention(*local, *text, groups=attn, valid_len=shard.valid_len,
                                                           text_valid=5)
            video_out = shard.gather(video_out, dim=1)
            keys = [torch.cat([full, t[:, :5]], dim=1) for full, t in ((k, text[1]), (v, text[2]))]
            ref = sdpa(torch.cat([q, text[0]], dim=1), *keys)
            for got, want in ((video_out, ref[:, :shape[1]]), (text_out, ref[:, shape[1]:])):
                results.append(((ulysses, ring, "joint"), shape, ((got - want).norm() / want.norm()).item()))
            texts.append(text_out)
        dist.barrier()
    return results, texts, meshes


def test_ulysses_ring_usp_match_sdpa():
    per_rank = run_ranks(4, _attention_case)
    for results, _, meshes in per_rank:
        for layout, shape, err in results:
            assert err <= 1e-5, (layout, shape, err)
        # The named DeviceMesh is built from our groups (so it carries their timeout).
        assert meshes == [(True, True)] * len(LAYOUTS)
    assert len(per_rank[0][0]) == 3 * len(LAYOUTS) * len(SHAPES)
    # Text stays replicated: every rank holds bitwise the same text output, so ranks never drift.
    for _, texts, _ in per_rank[1:]:
        for mine, first in zip(texts, per_rank[0][1]):
            assert torch.equal(mine, first)


def test_lse_kernels_agree_with_the_written_out_math():
    """Ring attention's merge needs each partial's log-sum-exp; the fused kernel chosen on this
    machine must give what the exact float32 formula gives (the GPU kernels are checked on a GPU)."""
    from unison.parallel.attention import attention_with_lse, lse_kernel_for

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g) for _ in range(3))
    kernel = lse_kernel_for(q)
    assert kernel in ("torch-cpu", "math")
    want_out, want_lse = attention_with_lse(q, k[:, :29], v[:, :29], kernel="math")
    got_out, got_lse = attention_with_lse(q, k[:, :29], v[:, :29], kernel=kernel)
    assert got_out.dtype == torch.float32 and got_out.shape == (2, 4, 37, 16) and got_lse.shape == (2, 4, 37)
    assert torch.allclose(got_out, want_out, atol=1e-5) and torch.allclose(got_lse, want_lse, atol=1e-5)
    # The lse really is log-sum-exp of the scaled scores (not, say, their max).
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :29]) / 4.0
    assert torch.allclose(want_lse, torch.logsumexp(scores, dim=-1), atol=1e-5)
