"""Sequence-parallel attention: Ulysses (all-to-all), Ring (K/V around a ring, log-sum-exp
merge), both at once (USP: Ulysses inside each ring chunk), and attention over whole-sequence K/V
held in a buffer (displaced patches' stale K/V, PipeFusion's stage buffers), through one entry
point, `sequence_attention`, with one local kernel chosen by `parallel.attention_backend`.

Tensors are (batch, tokens, heads, head_dim), as diffusers' attention processors hold them.
Each rank holds one equal-length shard of a sequence padded to a multiple of the parallel
degree; `valid_len` is the unpadded length, and padded keys are never attended to (they are
sliced off, not masked), so the result equals one-rank attention over the real tokens.

Local kernels (`attention_backend`): sdpa (torch's scaled_dot_product_attention; its fused
kernels return the log-sum-exp that Ring needs), flash-attn (FlashAttention 3 when its
`flash_attn_interface` module is installed, else 2; fp16/bf16 on a GPU), sage (SageAttention;
Ring needs 2.x, which returns the log-sum-exp), xfuser (xDiT's long-context attention does the
whole Ulysses x Ring exchange itself, over this engine's groups; exact sequence parallelism on
Wan only). auto: flash-attn on a GPU in fp16/bf16 when installed, else sdpa.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from unison.engine.errors import UserError
from unison.parallel.comm import CommStats, all_gather, all_to_all, ring_exchange

T = TypeVar("T")


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
    backend: str = "auto"
    """parallel.attention_backend: the local kernel."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@functools.cache
def _flash3():
    """FlashAttention 3's module (Hopper), or None. The module must have the kernel: the package
    index's `flash_attn_interface` 0.0.1 is an empty placeholder that imports fine."""
    try:
        import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface if callable(getattr(flash_attn_interface, "flash_attn_func", None)) else None


def _flash(q, k, v):
    fa3 = _flash3()
    if fa3 is not None:
        out = fa3.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _sage(q, k, v):
    from sageattention import sageattn

    # SageAttention 1.x subtracts the key mean from k in place: never hand it a buffer we keep.
    return sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)


LOCAL_KERNELS = {"sdpa": sdpa, "flash-attn": _flash, "sage": _sage}


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The local kernel for `backend` (auto: flash-attn for fp16/bf16 on a GPU when installed)."""
    if backend == "auto":
        fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (_has_flash_attn() or _flash3())
        return "flash-attn" if fast else "sdpa"
    return "flash-attn" if backend == "xfuser" else backend


def diffusers_backend(backend: str, *, device: torch.device, dtype: torch.dtype) -> str | None:
    """diffusers' own attention backend (`ModelMixin.set_attention_backend`) for the attention
    diffusers' processors still run: everything on one rank, cross-attention under sequence
    parallelism. None: leave diffusers' default (torch's sdpa)."""
    if backend == "auto":
        fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _has_flash_attn()
        return "flash" if fast else None
    if backend in ("flash-attn", "xfuser"):  # xfuser's own kernel is flash-attn
        return "_flash_3" if _flash3() is not None else ("flash" if _has_flash_attn() else None)
    return {"sdpa": None, "sage": "sage"}[backend]


def local_attention(q, k, v, *, backend: str = "auto") -> torch.Tensor:
    """Attention of q against k, v on this device: (B, Sq, H, D) x (B, Sk, H, D) -> (B, Sq, H, D)."""
    return LOCAL_KERNELS[resolve_backend(backend, q)](q, k, v)


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


def _lse_flash3(q, k, v):
    """FlashAttention 3: (out, lse) with return_attn_probs (older releases always return both)."""
    result = _flash3().flash_attn_func(q, k, v, return_attn_probs=True)
    out, lse = result[0], result[1]
    return out.transpose(1, 2).float(), lse


SAGE_NEEDS_2 = ("attention_backend=sage under ring attention needs SageAttention 2.x (return_lse); "
                "the installed one cannot merge ring chunks")


def _lse_sage(q, k, v):
    """SageAttention 2.x: natural-log LSE of the scaled scores. 1.x takes `return_lse=True` among
    its keyword arguments and ignores it (1.0.6 returns one tensor), so the result is checked."""
    from sageattention import sageattn

    try:
        result = sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False, return_lse=True)
    except TypeError:
        raise RuntimeError(SAGE_NEEDS_2) from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise RuntimeError(SAGE_NEEDS_2)
    out, lse = result
    return out.transpose(1, 2).float(), lse


LSE_KERNELS = {"math": _lse_math, "torch-cpu": _lse_torch_cpu, "flash-attn": _lse_flash_attn,
               "flash-attn-3": _lse_flash3, "torch-cuda": _lse_torch_cuda, "sage": _lse_sage}


@functools.cache
def _has_flash_attn() -> bool:
    """Looked up once: lse_kernel_for runs for every ring chunk."""
    return importlib.util.find_spec("flash_attn") is not None


def lse_kernel_for(q: torch.Tensor, backend: str = "auto") -> str:
    """The log-sum-exp kernel for q's device and dtype: the backend's own where it has one
    (flash-attn, sage), else the fastest of torch's."""
    chosen = resolve_backend(backend, q)
    if chosen == "flash-attn" and q.is_cuda:
        return "flash-attn-3" if _flash3() is not None else "flash-attn"
    if chosen == "sage":
        return "sage"
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16) and _has_flash_attn():
            return "flash-attn"
        return "torch-cuda"
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "torch-cpu"
    return "math"


def attention_with_lse(q, k, v, *, kernel: str | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scores, which ring attention needs to
    merge partial results. q, k, v: (B, S, H, D). Returns out (B, H, Sq, D) in float32 and lse
    (B, H, Sq). `kernel` overrides the choice of lse_kernel_for (tests compare them)."""
    return LSE_KERNELS[kernel or lse_kernel_for(q, backend)](q, k, v)


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


def _block_segments(start: int, length: int, block: int) -> list[tuple[int, int, int]]:
    """This rank's queries (sequence positions start..start+length) cut where causal blocks of
    `block` tokens begin: (first row, end row, the end of the keys those rows see) each."""
    segments, row = [], 0
    while row < length:
        end_of_block = ((start + row) // block + 1) * block
        end = min(length, end_of_block - start)
        segments.append((row, end, end_of_block))
        row = end
    return segments


def ring_attention(q, k, v, *, groups: AttentionGroups, valid: list[int], text=None, causal_block: int = 0):
    """Ring attention: this rank's queries against every rank's K/V chunk, chunk c holding
    `valid[c]` real keys at its start. The next chunk's transfer overlaps this chunk's compute.
    `causal_block` > 0: block-causal (sequence_attention): each causal block's queries take the
    chunk's keys before their block's end (a prefix, or none), merged as any partial is.

    `text` = (q_t, k_t, v_t), replicated on every ring rank, makes it joint attention: every
    query also attends to k_t/v_t, and q_t attends to every chunk. q_t's partial results are
    merged in chunk order, not arrival order, so its output is bitwise the same on every ring
    rank. Returns out, or (out, text_out) with `text`.
    """
    n, me = groups.ring_size, groups.ring_index
    if causal_block:
        return _ring_block_causal(q, k, v, groups=groups, valid=valid, block=causal_block)
    partial = None
    text_parts: list = [None] * n
    kv = [k, v]
    for step in range(n):
        chunk = (me - step) % n
        wait = ring_exchange(kv, group=groups.ring, stats=groups.stats) if step < n - 1 else None
        if valid[chunk] > 0:
            keys, values = kv[0][:, :valid[chunk]], kv[1][:, :valid[chunk]]
            o, l = attention_with_lse(q, keys, values, backend=groups.backend)
            partial = (o, l) if partial is None else merge_partials(*partial, o, l)
            if text is not None:
                text_parts[chunk] = attention_with_lse(text[0], keys, values, backend=groups.backend)
        if wait is not None:
            kv = wait()
    if text is None:
        return partial[0].transpose(1, 2).to(q.dtype)
    text_parts = [p for p in text_parts if p is not None]
    if text[1].shape[1] > 0:
        partial = merge_partials(*partial, *attention_with_lse(q, text[1], text[2], backend=groups.backend))
        text_parts.append(attention_with_lse(*text, backend=groups.backend))
    text_out = _merge_all(text_parts)[0]
    return partial[0].transpose(1, 2).to(q.dtype), text_out.transpose(1, 2).to(q.dtype)


def _ring_block_causal(q, k, v, *, groups: AttentionGroups, valid: list[int], block: int) -> torch.Tensor:
    """ring_attention under a block-causal structure: the K/V chunks pass round the ring as ever
    (every rank sends every chunk, so the collectives match on every rank); each segment of this
    rank's queries (one causal block's rows) merges the partials of the keys it sees."""
    n, me, size = groups.ring_size, groups.ring_index, q.shape[1]
    segments = _block_segments(me * size, size, block)
    partials: list = [None] * len(segments)
    kv = [k, v]
    for step in range(n):
        chunk = (me - step) % n
        wait = ring_exchange(kv, group=groups.ring, stats=groups.stats) if step < n - 1 else None
        for index, (first, end, seen_until) in enumerate(segments):
            keys = min(valid[chunk], seen_until - chunk * size)
            if keys <= 0:
                continue
            o, l = attention_with_lse(q[:, first:end], kv[0][:, :keys], kv[1][:, :keys], backend=groups.backend)
            partials[index] = (o, l) if partials[index] is None else merge_partials(*partials[index], o, l)
        if wait is not None:
            kv = wait()
    return torch.cat([p[0] for p in partials], dim=2).transpose(1, 2).to(q.dtype)


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


def own_heads(x: torch.Tensor, groups: AttentionGroups) -> torch.Tensor:
    """This Ulysses rank's slice of the heads of a tensor every rank holds in full."""
    per = x.shape[2] // groups.ulysses_size
    return x[:, :, groups.ulysses_index * per:(groups.ulysses_index + 1) * per]


KVSource = Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], T]], T]
"""(k, v, attend) -> attend(whole-sequence K, whole-sequence V): where patch parallelism keeps the
whole sequence's K/V (displaced: this rank's fresh chunk among the others' stale ones; PipeFusion:
the stage's buffer with the current patch refreshed)."""


def sequence_attention(q, k, v, *, groups: AttentionGroups, valid_len: int,
                       text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, text_valid: int = 0,
                       kv: KVSource | None = None, causal_block: int = 0, q_start: int = 0):
    """Attention of this rank's queries over the whole (unpadded) sequence: the one entry point of
    Ulysses, Ring, USP, displaced patches and PipeFusion.

    q, k, v: this rank's shard (B, L, H, D), the sequence padded to a multiple of the degree and
    `valid_len` long unpadded. Without `kv` the other shards' K/V come through the groups (Ulysses
    trades heads for tokens, Ring passes K/V chunks); with `kv` the whole sequence's K/V come from
    a buffer (`KVSource`), after Ulysses if any. `text` = (q, k, v) replicated on every rank makes
    it joint attention (HunyuanVideo): every query also attends to the first `text_valid` text
    keys, and the text queries attend to everything; under Ulysses each rank attends with its own
    heads of the text and the text outputs are gathered over heads, so every rank of the group
    holds the same text output. Returns this rank's output shard (B, L, H, D), and the text
    output (B, T, H, D) with `text`. `causal_block` > 0: the sequence is in blocks of that many
    tokens from the start and a query sees only the keys of its block and those before (a
    diffusion-forcing model's block-causal mask); Ulysses, Ring, both, and a `kv` buffer (patches),
    whose queries start at sequence position `q_start` (after Ulysses), take it."""
    if causal_block and (text is not None or groups.backend == "xfuser"):
        raise NotImplementedError("a block-causal mask does not take joint text or the xfuser backend")
    if groups.backend == "xfuser" and kv is None:
        return xfuser_attention(q, k, v, groups=groups, valid_len=valid_len, text=text)
    u = groups.ulysses_size
    if u > 1:
        check_heads(q.shape[2], u)
        q, k, v = (scatter_heads(t, groups) for t in (q, k, v))
        if text is not None:
            text = tuple(own_heads(t, groups) for t in text)
    if text is not None:
        text = (text[0], text[1][:, :text_valid], text[2][:, :text_valid])
    if kv is not None and causal_block:
        out = kv(k, v, lambda keys, values: _block_causal(q, keys[:, :valid_len], values[:, :valid_len], causal_block,
                                                          backend=groups.backend, start=q_start))
    elif kv is not None:
        out = kv(k, v, lambda keys, values: _over(q, keys[:, :valid_len], values[:, :valid_len], text,
                                                  backend=groups.backend))
    elif groups.ring_size > 1:
        chunk = q.shape[1]
        valid = [max(0, min(chunk, valid_len - c * chunk)) for c in range(groups.ring_size)]
        out = ring_attention(q, k, v, groups=groups, valid=valid, text=text, causal_block=causal_block)
    else:
        # Only the real queries: the padded rows' output is zero (they are trimmed at the gather).
        chunk = q.shape[1]
        if causal_block:
            out = _block_causal(q[:, :valid_len], k[:, :valid_len], v[:, :valid_len], causal_block,
                                backend=groups.backend)
        else:
            out = _over(q[:, :valid_len], k[:, :valid_len], v[:, :valid_len], text, backend=groups.backend)
        if valid_len < chunk:
            video = out[0] if text is not None else out
            video = torch.cat([video, video.new_zeros(video.shape[0], chunk - valid_len, *video.shape[2:])], dim=1)
            out = (video, out[1]) if text is not None else video
    if text is None:
        return gather_heads(out, groups) if u > 1 else out
    out, text_out = out
    if u > 1:
        out = gather_heads(out, groups)
        text_out = all_gather(text_out, dim=2, group=groups.ulysses, stats=groups.stats)
    return out, text_out


def _block_causal(q, k, v, block: int, *, backend: str, start: int = 0) -> torch.Tensor:
    """Block-causal attention without a mask: the queries (sequence positions start.. of the keys'
    sequence) of each block against the keys up to that block's end (a prefix), one kernel call
    per block, so any backend (flash too) serves."""
    return torch.cat([local_attention(q[:, first:end], k[:, :seen_until], v[:, :seen_until], backend=backend)
                      for first, end, seen_until in _block_segments(start, q.shape[1], block)], dim=1)


def _over(q, k, v, text, *, backend: str):
    """Local attention of q (and the text queries) against k, v (and the text keys): one kernel
    call over the concatenation, as one rank's joint attention does."""
    if text is None:
        return local_attention(q, k, v, backend=backend)
    tq, tk, tv = text
    both = local_attention(torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1),
                           backend=backend)
    return both[:, :q.shape[1]], both[:, q.shape[1]:]


_XFUSER_LAYERS: dict[int, object] = {}


def xfuser_attention(q, k, v, *, groups: AttentionGroups, valid_len: int, text=None) -> torch.Tensor:
    """xDiT's long-context attention (xfuser's xFuserLongContextAttention: Ulysses inside Ring
    with its own kernels) over this engine's Ulysses and Ring groups, handed to it through
    yunchang's group registry instead of xfuser's global initialisation. It takes the shard as
    it is (it does its own all-to-all) and cannot leave padding out of attention, so the token
    count must divide over the ranks; it has no masked joint text (plan_run refuses
    HunyuanVideo with it)."""
    if text is not None:
        raise RuntimeError("attention_backend=xfuser does not take joint text attention (HunyuanVideo); "
                           "use sdpa or flash-attn")
    ranks = groups.ulysses_size * groups.ring_size
    if valid_len != q.shape[1] * ranks:
        raise RuntimeError(f"attention_backend=xfuser cannot leave padding out of attention: {valid_len} tokens "
                           f"do not divide over {ranks} ranks; pick a size whose token count does, or use sdpa "
                           f"or flash-attn")
    layer = _XFUSER_LAYERS.get(id(groups))
    if layer is None:
        import torch.distributed as dist
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.globals import PROCESS_GROUP

        # An axis of degree 1 has no group of ours; yunchang needs one of this rank alone
        # (new_subgroups is collective: every rank reaches this first attention together).
        alone = None
        if groups.ulysses is None or groups.ring is None:
            alone, _ = dist.new_subgroups(group_size=1)
        PROCESS_GROUP.ULYSSES_PG = groups.ulysses or alone
        PROCESS_GROUP.RING_PG = groups.ring or alone
        layer = _XFUSER_LAYERS[id(groups)] = xFuserLongContextAttention()
    return layer(None, q, k, v)
