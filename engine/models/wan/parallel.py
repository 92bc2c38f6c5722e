"""Where Wan's sequence is split and gathered, and its self-attention under sequence parallelism.

Split at the first block's input (tokens, per-token modulation for TI2V-5B, rotary tables),
gather after the last block, so patch embedding, timestep modulation, RoPE tables, the output
norm and projection see exactly what they see on one rank. Cross-attention to the text needs
no communication: text is replicated on every rank.
"""

from __future__ import annotations

import weakref

import torch

from unison.parallel.attention import sequence_attention
from unison.parallel.pipefusion import PipeStage
from unison.parallel.sequence import SequenceShard, Split, TokenPlan


def _qkv(attn, hidden_states, rotary_emb):
    """Projections, q/k norms and RoPE, as Wan's own processor computes them. The rotation is
    diffusers' `apply_rotary_emb` on Wan's (1, tokens, 1, dim) tables: bitwise what Wan's processor
    computes inline (its pairs of equal frequencies): tests/test_bf16.py holds Ulysses 2 in bfloat16
    to torch.equal with diffusers on one rank."""
    from diffusers.models.embeddings import apply_rotary_emb

    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        tables = tuple(t[0, :, 0] for t in rotary_emb)
        q, k = (apply_rotary_emb(t, tables, sequence_dim=1) for t in (q, k))
    return q, k, v


@torch.compiler.disable
def _attend_across(shard: SequenceShard, attn, q, k, v, mask=None) -> torch.Tensor:
    """The part of the processor that communicates and reads per-forward state (valid length,
    stale K/V keyed by layer): never traced, so under model.compile=blocks it runs eagerly between
    the compiled projections and output (engine/compile.py). `mask`: SkyReels-V2 diffusion
    forcing's block-causal mask over the whole sequence (1, 1, L, L), read once per forward as the
    token length of its blocks (its first row's visible keys)."""
    kv = shard.displaced.source(id(attn)) if shard.displaced is not None else None
    block = _block_length(shard.cache, mask)
    # After Ulysses this rank's queries are its Ulysses group's shards, consecutive in the sequence.
    u = shard.attention.ulysses_size
    start = shard.index // u * u * q.shape[1]
    return sequence_attention(q, k, v, groups=shard.attention, valid_len=shard.valid_len, kv=kv, causal_block=block,
                              q_start=start)


def _block_length(cache: dict, mask) -> int:
    """Tokens per causal block of a block-causal mask (its first row's visible keys), read once per
    forward into `cache`; 0 without a mask."""
    if mask is None:
        return 0
    if "causal_block" not in cache:
        cache["causal_block"] = int(mask[0, 0, 0].sum())
    return cache["causal_block"]


class WanSelfAttention:
    """Processor for a Wan block's attn1 whose attention runs across the sequence-parallel group
    (exact), or over this patch's fresh and the other patches' stale K/V (patch parallelism)."""

    def __init__(self, shard: SequenceShard):
        self.shard = shard

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, rotary_emb)
        out = _attend_across(self.shard, attn, q, k, v, attention_mask).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanStageAttention:
    """Processor for attn1 of a PipeFusion stage's blocks: the current patch's queries against
    the layer's full-sequence K/V buffer (this patch fresh, the rest as the stage last saw it)."""

    def __init__(self, stage: PipeStage):
        self.stage = stage
        self.mask: tuple = (None, 0)
        """(a weak reference to the last block-causal mask seen, its block length): read once per
        forward (every block of the forward hands the same mask), never keeping it alive."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, rotary_emb)
        block = 0
        if attention_mask is not None:
            seen, block = self.mask
            if seen is None or seen() is not attention_mask:
                block = _block_length({}, attention_mask)
                self.mask = (weakref.ref(attention_mask), block)
        out = _attend_stage(self.stage, attn, q, k, v, block).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@torch.compiler.disable
def _attend_stage(stage: PipeStage, attn, q, k, v, block: int = 0) -> torch.Tensor:
    """The stage's K/V buffer update and attention: never traced (the current patch's span and
    the buffers are per-forward state), like _attend_across. The patch's queries start at its
    span's start (a block-causal mask's prefixes count from there)."""
    return sequence_attention(q, k, v, groups=stage.attention(), valid_len=stage.span[2], kv=stage.source(id(attn)),
                              causal_block=block, q_start=stage.span[0])


TOKEN_PLAN = TokenPlan(
    blocks=("blocks",), attention="attn1", exact=WanSelfAttention, staged=WanStageAttention,
    # Wan's blocks take (hidden, text, modulation, rope): the text is cross-attended whole on every
    # rank; TI2V-5B's modulation is per token (B, tokens, 6, D); the rotary tables (1, tokens, 1, dim).
    splits={2: Split(dim=1, when=lambda modulation: modulation.ndim == 4), 3: Split(dim=1, each=True)},
    reused=(2, 3))
"""Split at the first block's input, gathered after the last block's output."""
