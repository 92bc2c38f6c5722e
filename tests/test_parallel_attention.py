"""Attention-level parity through the one entry point (`sequence_attention`): Ulysses, Ring and USP
shards equal one-rank SDPA, uneven lengths included, for plain self-attention (Wan) and for joint
video+text attention with padded text (HunyuanVideo); the local kernels agree with the exact math."""

from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist

from multirank import run_ranks
import pytest

from unison.parallel.attention import AttentionGroups, local_attention, sdpa, sequence_attention
from unison.parallel.comm import CommStats
from unison.parallel.dims import ParallelDims, build_groups
from unison.parallel.sequence import SequenceShard

# (ulysses, ring, cfg filler) on 4 ranks; the cfg axis only fills the world when sp < 4.
LAYOUTS = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]
SHAPES = [(1, 48, 4, 8), (2, 37, 4, 16), (1, 5, 8, 8), (1, 130, 4, 4)]


def _attention_case(rank, world):
    results, texts = [], []
    for ulysses, ring, cfg in LAYOUTS:
        dims = ParallelDims(cfg=cfg, ring=ring, ulysses=ulysses, world_size=world)
        groups = build_groups(dims, rank=rank, timeout_s=60)
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
            out = shard.gather(sequence_attention(*local, groups=attn, valid_len=shard.valid_len), dim=1)
            ref = sdpa(q, k, v)
            err = ((out - ref).norm() / ref.norm()).item()
            results.append(((ulysses, ring), shape, err))
            # Joint: 7 text tokens of which the first 5 are real; one rank masks the other 2 as keys.
            text = [torch.randn(shape[0], 7, *shape[2:], generator=g) for _ in range(3)]
            video_out, text_out = sequence_attention(*local, groups=attn, valid_len=shard.valid_len,
                                                     text=tuple(text), text_valid=5)
            video_out = shard.gather(video_out, dim=1)
            keys = [torch.cat([full, t[:, :5]], dim=1) for full, t in ((k, text[1]), (v, text[2]))]
            ref = sdpa(torch.cat([q, text[0]], dim=1), *keys)
            for got, want in ((video_out, ref[:, :shape[1]]), (text_out, ref[:, shape[1]:])):
                results.append(((ulysses, ring, "joint"), shape, ((got - want).norm() / want.norm()).item()))
            texts.append(text_out)
        dist.barrier()
    return results, texts


def test_ulysses_ring_usp_match_sdpa():
    per_rank = run_ranks(4, _attention_case)
    for results, _ in per_rank:
        for layout, shape, err in results:
            assert err <= 1e-5, (layout, shape, err)
    assert len(per_rank[0][0]) == 3 * len(LAYOUTS) * len(SHAPES)
    # Text stays replicated: every rank holds bitwise the same text output, so ranks never drift.
    for _, texts in per_rank[1:]:
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


def test_a_kv_source_sees_the_whole_sequence_after_ulysses():
    """With `kv` (displaced patches, PipeFusion) the source gets this rank's fresh K/V after the
    head scatter and hands back whole-sequence K/V; padded keys beyond valid_len are never attended."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 10, 4, 8, generator=g) for _ in range(3))
    extra = torch.randn(1, 3, 4, 8, generator=g)  # stands in for padding after the real keys
    seen = []

    def source(fresh_k, fresh_v, attend):
        seen.append(fresh_k.shape)
        return attend(torch.cat([fresh_k, extra], dim=1), torch.cat([fresh_v, extra], dim=1))

    out = sequence_attention(q, k, v, groups=AttentionGroups(), valid_len=10, kv=source)
    assert seen == [k.shape] and torch.allclose(out, sdpa(q, k, v), atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_local_kernels_on_this_machine_match_the_exact_math(backend):
    from unison.parallel.attention import attention_with_lse

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 33, 4, 16, generator=g) for _ in range(3))
    want, _ = attention_with_lse(q, k, v, kernel="math")
    got = local_attention(q, k, v, backend=backend)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)


# ---- GPU kernels: flash-attn, SageAttention, xfuser, torch's CUDA kernels (pytest -m gpu) ------

GPU_BACKENDS = [("sdpa", None), ("flash-attn", "flash_attn"), ("sage", "sageattention")]
# bf16/fp16 against the float32 math: a few ulps of the output scale (SageAttention quantises
# q and k to int8, hence its looser bound).
TOLERANCE = {"sdpa": 2e-2, "flash-attn": 2e-2, "sage": 6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend, package", GPU_BACKENDS, ids=[b for b, _ in GPU_BACKENDS])
def test_gpu_kernels_match_the_exact_math(backend, package, dtype):
    """Output and log-sum-exp (the shapes ring attention merges) of each backend's kernel against
    the float32 formula, at a length no kernel tile divides."""
    from unison.parallel.attention import attention_with_lse, lse_kernel_for

    if package is not None:
        pytest.importorskip(package)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 301, 8, 64, generator=g).to("cuda", dtype) for _ in range(3))
    want_out, want_lse = attention_with_lse(q.float(), k.float(), v.float(), kernel="math")
    got = local_attention(q, k, v, backend=backend)
    assert got.shape == q.shape and got.dtype == dtype
    assert (got.float() - want_out.transpose(1, 2)).abs().max().item() <= TOLERANCE[backend]
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert lse_kernel_for(q, backend) != "math"
    assert out.shape == (2, 8, 301, 64) and lse.shape == (2, 8, 301) and lse.dtype == torch.float32
    assert (lse - want_lse).abs().max().item() <= TOLERANCE[backend] * 5
    assert (out - want_out).abs().max().item() <= TOLERANCE[backend]


@pytest.mark.gpu
def test_xfuser_long_context_attention_on_one_rank_matches_sdpa(tmp_path):
    """xfuser's layer over groups of this rank alone (one GPU): the exact local attention."""
    pytest.importorskip("xfuser")
    import datetime

    from multirank import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 256, 8, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
        out = sequence_attention(q, k, v, groups=AttentionGroups(backend="xfuser"), valid_len=256)
        want = sdpa(q.float(), k.float(), v.float())
        assert (out.float() - want).abs().max().item() <= 2e-2
    finally:
        dist.destroy_process_group()


# ---- the optional packages as the package index ships them (fake modules, CPU) -------------------

def _fake_module(monkeypatch, name: str, **attributes):
    import types

    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_an_empty_flash_attn_interface_is_not_taken_for_flashattention_3(monkeypatch):
    """The index's `flash_attn_interface` 0.0.1 is an empty placeholder: importable, no kernel."""
    from unison.parallel import attention

    attention._flash3.cache_clear()
    monkeypatch.setattr(attention, "_flash3", functools.cache(attention._flash3.__wrapped__))
    _fake_module(monkeypatch, "flash_attn_interface")
    assert attention._flash3() is None
    attention._flash3.cache_clear()
    real = _fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=lambda q, k, v, **kw: q)
    assert attention._flash3() is real


def _sage_1(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
    """SageAttention 1.0.6's signature: extra keywords (return_lse among them) are swallowed, and
    one tensor comes back."""
    return sdpa(q, k, v)


def _sage_2(q, k, v, tensor_layout="HND", is_causal=False, return_lse=False):
    from unison.parallel.attention import attention_with_lse

    out, lse = attention_with_lse(q, k, v, kernel="math")
    return (out.transpose(1, 2), lse) if return_lse else out.transpose(1, 2)


@pytest.mark.parametrize("sageattn, error", [(_sage_1, "needs SageAttention 2.x"), (_sage_2, None)],
                         ids=["1.x", "2.x"])
def test_sage_under_ring_needs_the_log_sum_exp(monkeypatch, sageattn, error):
    from unison.parallel.attention import attention_with_lse

    _fake_module(monkeypatch, "sageattention", sageattn=sageattn)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 11, 2, 8, generator=g) for _ in range(3))
    if error:
        with pytest.raises(RuntimeError, match=error):
            attention_with_lse(q, k, v, kernel="sage")
    else:
        out, lse = attention_with_lse(q, k, v, kernel="sage")
        want_out, want_lse = attention_with_lse(q, k, v, kernel="math")
        assert torch.allclose(out, want_out) and torch.allclose(lse, want_lse)
