"""Sequence-parallel attention: Ulysses (all-to-all), Ring (K/V around a ring, log-sum-exp
merge), and both at once (USP: Ulysses inside each ring chunk).

Tensors are (batch, tokens, heads, head_dim), as diffusers' attention processors hold them.
Each rank holds one equal-length shard of a sequence padded to a multiple of the parallel
degree; `valid_len` is the unpadded length, and padded keys are never attended to (they are
sliced off, not masked), so the result equals one-rank attention over the real tokens.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unison.errors import UserError
from unison.parallel.comm import CommStats, all_gather, all_to_all, ring_exchange


@dataclass
class AttentionGroups:
    """The groups one sequence-parallel attention uses (None where the degree is 1)."""

    ulysses: object | None = None
    ulysses_size: int = 1
    ring: object | None = None
    ring_size: int = 1
    ring_index: int = 0
    ulysses_index: int = 0
    stats: CommStats | None = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _lse_math(q, k, v):
    """Exact attention in float32 written out: the reference, and the fallback everywhere."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ vh, lse


def _lse_torch_cpu(q, k, v):
    """torch's fused CPU flash kernel, which returns the log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.float(), lse


def _lse_flash_attn(q, k, v):
    """flash-attn (when installed, fp16/bf16 on a GPU): takes (B, S, H, D) as we hold it."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out.transpose(1, 2).float(), lse


def _lse_torch_cuda(q, k, v):
    """torch's memory-efficient CUDA kernel (any float dtype), asked for the log-sum-exp."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)
    return out.float(), lse[..., :q.shape[1]]


LSE_KERNELS = {"math": _lse_math, "torch-cpu": _lse_torch_cpu, "flash-attn": _lse_flash_attn,
               "torch-cuda": _lse_torch_cuda}


@functools.cache
def _has_flash_attn() -> bool:
    """Looked up once: lse_kernel_for runs for every ring chunk."""
    return importlib.util.find_spec("flash_attn") is not None


def lse_kernel_for(q: torch.Tensor) -> str:
    """The fastest log-sum-exp kernel for q's device and dtype."""
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16) and _has_flash_attn():
            return "flash-attn"
        return "torch-cuda"
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "torch-cpu"
    return "math"


def attention_with_lse(q, k, v, *, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scores, which ring attention needs to
    merge partial results. q, k, v: (B, S, H, D). Returns out (B, H, Sq, D) in float32 and lse
    (B, H, Sq). `kernel` overrides the choice of lse_kernel_for (tests compare them)."""
    return LSE_KERNELS[kernel or lse_kernel_for(q)](q, k, v)


def merge_partials(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets (log-sum-exp weighting)."""
    new_lse = torch.logaddexp(lse, lse_b)
    return (out * torch.exp(lse - new_lse).unsqueeze(-1)
            + out_b * torch.exp(lse_b - new_lse).unsqueeze(-1)), new_lse


def _merge_all(parts):
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge_partials(out, lse, o, l)
    return out, lse


def ring_attention(q, k, v, *, groups: AttentionGroups, valid: list[int], text=None):
    """Ring attention: this rank's queries against every rank's K/V chunk, chunk c holding
    `valid[c]` real keys at its start. The next chunk's transfer overlaps this chunk's compute.

    `text` = (q_t, k_t, v_t), replicated on every ring rank, makes it joint attention: every
    query also attends to k_t/v_t, and q_t attends to every chunk. q_t's partial results are
    merged in chunk order, not arrival order, so its output is bitwise the same on every ring
    rank. Returns out, or (out, text_out) with `text`.
    """
    n, me = groups.ring_size, groups.ring_index
    partial = None
    text_parts: list = [None] * n
    kv = [k, v]
    for step in range(n):
        chunk = (me - step) % n
        wait = ring_exchange(kv, group=groups.ring, stats=groups.stats) if step < n - 1 else None
        if valid[chunk] > 0:
            keys, values = kv[0][:, :valid[chunk]], kv[1][:, :valid[chunk]]
            o, l = attention_with_lse(q, keys, values)
            partial = (o, l) if partial is None else merge_partials(*partial, o, l)
            if text is not None:
                text_parts[chunk] = attention_with_lse(text[0], keys, values)
        if wait is not None:
            kv = wait()
    if text is None:
        return partial[0].transpose(1, 2).to(q.dtype)
    text_parts = [p for p in text_parts if p is not None]
    if text[1].shape[1] > 0:
        partial = merge_partials(*partial, *attention_with_lse(q, text[1], text[2]))
        text_parts.append(attention_with_lse(*text))
    text_out = _merge_all(text_parts)[0]
    return partial[0].transpose(1, 2).to(q.dtype), text_out.transpose(1, 2).to(q.dtype)


def scatter_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """(B, L, H, D) sequence shard, all heads -> (B, U·L, H/U, D) all of this group's tokens."""
    u = groups.ulysses_size
    b, length, heads, dim = x.shape
    x = x.reshape(b, length, u, heads // u, dim).permute(2, 0, 1, 3, 4)
    x = all_to_all(x, group=groups.ulysses, stats=groups.stats)
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * length, heads // u, dim)


def gather_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """Inverse of scatter_heads."""
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
        q, k, v = (scatter_heads(t, groups) for t in (q, k, v))
    chunk = q.shape[1]
    if groups.ring_size > 1:
        valid = [max(0, min(chunk, valid_len - c * chunk)) for c in range(groups.ring_size)]
        out = ring_attention(q, k, v, groups=groups, valid=valid)
    else:
        out = sdpa(q[:, :valid_len], k[:, :valid_len], v[:, :valid_len])
        if valid_len < chunk:
            out = torch.cat([out, out.new_zeros(out.shape[0], chunk - valid_len, *out.shape[2:])], dim=1)
    if groups.ulysses_size > 1:
        out = gather_heads(out, groups)
    return out


def own_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """This Ulysses rank's slice of the heads of a tensor every rank holds in full."""
    per = x.shape[2] // groups.ulysses_size
    return x[:, :, groups.ulysses_index * per:(groups.ulysses_index + 1) * per]


def parallel_joint_attention(q, k, v, text_q, text_k, text_v, *, groups: AttentionGroups, valid_len: int,
                             text_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention over sharded video tokens and replicated text tokens (HunyuanVideo's
    dual- and single-stream blocks): every query, video or text, attends to the `valid_len` real
    video tokens and the first `text_valid` text tokens, as one rank's masked attention does.

    Returns this rank's shard of the video output (B, L, H, D) and the whole text output
    (B, T, H, D), the same on every rank of the group. Under Ulysses each rank attends with its
    own heads of the text and the text outputs are gathered over heads; under Ring every rank
    computes the text queries against every chunk (text is short, so this duplicate work is
    cheaper than another exchange).
    """
    u = groups.ulysses_size
    if u > 1:
        check_heads(q.shape[2], u)
        q, k, v = (scatter_heads(t, groups) for t in (q, k, v))
        text_q, text_k, text_v = (own_heads(t, groups) for t in (text_q, text_k, text_v))
    text_k, text_v = text_k[:, :text_valid], text_v[:, :text_valid]
    chunk = q.shape[1]
    if groups.ring_size > 1:
        valid = [max(0, min(chunk, valid_len - c * chunk)) for c in range(groups.ring_size)]
        out, text_out = ring_attention(q, k, v, groups=groups, valid=valid, text=(text_q, text_k, text_v))
    else:
        both = sdpa(torch.cat([q[:, :valid_len], text_q], dim=1), torch.cat([k[:, :valid_len], text_k], dim=1),
                    torch.cat([v[:, :valid_len], text_v], dim=1))
        out, text_out = both[:, :valid_len], both[:, valid_len:]
        if valid_len < chunk:
            out = torch.cat([out, out.new_zeros(out.shape[0], chunk - valid_len, *out.shape[2:])], dim=1)
    if u > 1:
        out = gather_heads(out, groups)
        text_out = all_gather(text_out, dim=2, group=groups.ulysses, stats=groups.stats)
    return out, text_out
