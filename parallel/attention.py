"""Sequence-parallel attention: Ulysses (all-to-all), Ring (K/V around a ring, log-sum-exp
merge), and both at once (USP: Ulysses inside each ring chunk).

Tensors are (batch, tokens, heads, head_dim), as diffusers' attention processors hold them.
Each rank holds one equal-length shard of a sequence padded to a multiple of the parallel
degree; `valid_len` is the unpadded length, and padded keys are never attended to (they are
sliced off, not masked), so the result equals one-rank attention over the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unison.errors import UserError
from unison.parallel.comm import CommStats, all_to_all, ring_exchange


@dataclass
class AttentionGroups:
    """The groups one sequence-parallel attention uses (None where the degree is 1)."""

    ulysses: object | None = None
    ulysses_size: int = 1
    ring: object | None = None
    ring_size: int = 1
    ring_index: int = 0
    stats: CommStats | None = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float32 that also returns the log-sum-exp of the scores.

    Returns out (B, H, Sq, D) float32 and lse (B, H, Sq). This is the CPU path; on a GPU a
    fused kernel that returns the LSE (flash-attn) does the same job faster.
    """
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ vh, lse


def merge_partials(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets (log-sum-exp weighting)."""
    new_lse = torch.logaddexp(lse, lse_b)
    return (out * torch.exp(lse - new_lse).unsqueeze(-1)
            + out_b * torch.exp(lse_b - new_lse).unsqueeze(-1)), new_lse


def ring_attention(q, k, v, *, groups: AttentionGroups, valid: list[int]) -> torch.Tensor:
    """Ring attention: this rank's queries against every rank's K/V chunk, chunk c holding
    `valid[c]` real keys at its start. The next chunk's transfer overlaps this chunk's compute."""
    n, me = groups.ring_size, groups.ring_index
    out = lse = None
    kv = [k, v]
    for step in range(n):
        chunk = (me - step) % n
        wait = ring_exchange(kv, group=groups.ring, stats=groups.stats) if step < n - 1 else None
        if valid[chunk] > 0:
            o, l = attention_with_lse(q, kv[0][:, :valid[chunk]], kv[1][:, :valid[chunk]])
            out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
        if wait is not None:
            kv = wait()
    return out.transpose(1, 2).to(q.dtype)


def _scatter_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """(B, L, H, D) sequence shard, all heads -> (B, U·L, H/U, D) all of this group's tokens."""
    u = groups.ulysses_size
    b, length, heads, dim = x.shape
    x = x.reshape(b, length, u, heads // u, dim).permute(2, 0, 1, 3, 4)
    x = all_to_all(x, group=groups.ulysses, stats=groups.stats)
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * length, heads // u, dim)


def _gather_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """Inverse of _scatter_heads."""
    u = groups.ulysses_size
    b, total, heads, dim = x.shape
    x = x.reshape(b, u, total // u, heads, dim).permute(1, 0, 2, 3, 4)
    x = all_to_all(x, group=groups.ulysses, stats=groups.stats)
    return x.permute(1, 2, 0, 3, 4).reshape(b, total // u, u * heads, dim)


def check_heads(heads: int, ulysses: int) -> None:
    if heads % ulysses:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise UserError(
            f"Ulysses degree {ulysses} does not divide the model's {heads} attention heads; valid Ulysses "
            f"degrees: {', '.join(map(str, valid))} (use ring for the rest)"
        )


def parallel_attention(q, k, v, *, groups: AttentionGroups, valid_len: int) -> torch.Tensor:
    """Self-attention over the whole (unpadded) sequence from this rank's shards; returns this
    rank's shard of the output, (B, L, H, D)."""
    if groups.ulysses_size > 1:
        check_heads(q.shape[2], groups.ulysses_size)
        q, k, v = (_scatter_heads(t, groups) for t in (q, k, v))
    chunk = q.shape[1]
    if groups.ring_size > 1:
        valid = [max(0, min(chunk, valid_len - c * chunk)) for c in range(groups.ring_size)]
        out = ring_attention(q, k, v, groups=groups, valid=valid)
    else:
        out = sdpa(q[:, :valid_len], k[:, :valid_len], v[:, :valid_len])
        if valid_len < chunk:
            out = torch.cat([out, out.new_zeros(out.shape[0], chunk - valid_len, *out.shape[2:])], dim=1)
    if groups.ulysses_size > 1:
        out = _gather_heads(out, groups)
    return out
