"""Where Wan's sequence is split and gathered, and its self-attention under sequence parallelism.

Split at the first block's input (tokens, per-token modulation for TI2V-5B, rotary tables),
gather after the last block, so patch embedding, timestep modulation, RoPE tables, the output
norm and projection see exactly what they see on one rank. Cross-attention to the text needs
no communication: text is replicated on every rank.
"""

from __future__ import annotations

import torch

from unison.parallel.attention import sequence_attention
from unison.parallel.pipefusion import BlockCalls, PipeStage, apply_pipefusion
from unison.parallel.sequence import Handle, SequenceShard, install_split_gather


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
def _attend_across(shard: SequenceShard, attn, q, k, v) -> torch.Tensor:
    """The part of the processor that communicates and reads per-forward state (valid length,
    stale K/V keyed by layer): never traced, so under model.compile=blocks it runs eagerly between
    the compiled projections and output (engine/compile.py)."""
    kv = shard.displaced.source(id(attn)) if shard.displaced is not None else None
    return sequence_attention(q, k, v, groups=shard.attention, valid_len=shard.valid_len, kv=kv)


class WanSelfAttention:
    """Processor for a Wan block's attn1 whose attention runs across the sequence-parallel group
    (exact), or over this patch's fresh and the other patches' stale K/V (patch parallelism)."""

    def __init__(self, shard: SequenceShard):
        self.shard = shard

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, rotary_emb)
        out = _attend_across(self.shard, attn, q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def sequence_parallel_plan(transformer, shard: SequenceShard, handle: Handle) -> None:
    blocks = transformer.blocks

    def split_inputs(module, args):
        hidden, text, modulation, rope = args
        hidden = shard.split(hidden, dim=1, record=True)
        if modulation.ndim == 4:  # TI2V-5B: one modulation per token
            modulation = shard.split(modulation, dim=1)
        rope = tuple(shard.split(t, dim=1) for t in rope)
        shard.cache.update(modulation=modulation, rope=rope)
        return hidden, text, modulation, rope

    def reuse_inputs(module, args):
        return args[0], args[1], shard.cache["modulation"], shard.cache["rope"]

    def gather_output(module, args, output):
        shard.cache.clear()
        return shard.gather(output, dim=1)

    install_split_gather(handle, blocks, split=split_inputs, reuse=reuse_inputs, gather=gather_output,
                         attention="attn1", processor=WanSelfAttention(shard))


class WanStageAttention:
    """Processor for attn1 of a PipeFusion stage's blocks: the current patch's queries against
    the layer's full-sequence K/V buffer (this patch fresh, the rest as the stage last saw it)."""

    def __init__(self, stage: PipeStage):
        self.stage = stage

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, rotary_emb)
        out = _attend_stage(self.stage, attn, q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@torch.compiler.disable
def _attend_stage(stage: PipeStage, attn, q, k, v) -> torch.Tensor:
    """The stage's K/V buffer update and attention: never traced (the current patch's span and
    the buffers are per-forward state), like _attend_across."""
    return sequence_attention(q, k, v, groups=stage.attention(), valid_len=stage.span[2], kv=stage.source(id(attn)))


def _patch_args(rest: tuple, start: int, end: int) -> tuple:
    """A block's other inputs for tokens [start, end): text whole, per-token modulation (TI2V-5B)
    and the rotary tables sliced."""
    text, modulation, rope = rest
    if modulation.ndim == 4:
        modulation = modulation[:, start:end]
    return text, modulation, tuple(t[:, start:end] for t in rope)


BLOCK_CALLS = BlockCalls(prepare=lambda args: (args[0], (), args[1:]),
                         call=lambda block, x, carried, rest: (block(x, *rest), carried),
                         slice_rest=_patch_args, finish=lambda hidden, args: hidden)
"""Wan's blocks take (hidden, text, modulation, rope) and return hidden; text is cross-attended
and never updated, so nothing is carried."""


def pipefusion_plan(transformer, stage: PipeStage):
    def install(blocks, stage):
        for block in blocks:
            block.attn1.set_processor(WanStageAttention(stage))

    return apply_pipefusion(transformer, attrs=("blocks",), stage=stage, calls=BLOCK_CALLS, install_attention=install)
