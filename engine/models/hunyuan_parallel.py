"""Where HunyuanVideo's sequence is split and gathered, and its joint attention under sequence
parallelism, displaced patches and PipeFusion.

Video tokens are split at the first dual-stream block's input (with the rotary tables) and
gathered after the last single-stream block, so patch embedding, RoPE tables, timestep and
guidance embeddings, the output norm and projection see exactly what they see on one rank. Text
tokens stay whole on every rank: the token refiner runs locally, and in every block each rank
carries the full text stream. Under exact sequence parallelism joint attention makes every
rank's text output identical (see parallel_joint_attention), so the replicated text never drifts
between ranks. Under patch parallelism each patch carries its own copy of the text (see
displaced_joint_attention and parallel/pipefusion.py): exact in warm-up, part of the measured
approximation afterwards. The text stream leaves the blocks unused (the output head reads only
the video tokens).
"""

from __future__ import annotations

import torch

from unison.parallel.attention import parallel_joint_attention
from unison.parallel.patch import displaced_joint_attention, joint_over
from unison.parallel.pipefusion import BlockCalls, PipeStage, apply_pipefusion
from unison.parallel.sequence import Handle, SequenceShard, install_split_gather

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def _joint_qkv(attn, video, text, rope):
    """Video and text q, k, v (batch, tokens, heads, head_dim) as HunyuanVideo's processor
    computes them: dual-stream blocks give text its own projections (add_q_proj…), single-stream
    blocks send it through the same ones; RoPE on the video tokens only."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = (_heads(proj(video), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    dual = attn.add_q_proj is not None
    projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if dual else (attn.to_q, attn.to_k, attn.to_v)
    tq, tk, tv = (_heads(proj(text), attn.heads) for proj in projections)
    tq, tk = (attn.norm_added_q(tq), attn.norm_added_k(tk)) if dual else (attn.norm_q(tq), attn.norm_k(tk))
    return q, k, v, tq, tk, tv


def _joint_out(attn, out, text_out, dtype):
    out, text_out = out.flatten(2, 3).to(dtype), text_out.flatten(2, 3).to(dtype)
    if getattr(attn, "to_out", None) is not None:
        out = attn.to_out[1](attn.to_out[0](out))
    if getattr(attn, "to_add_out", None) is not None:
        text_out = attn.to_add_out(text_out)
    return out, text_out


class HunyuanJointAttention:
    """Processor for the `attn` of HunyuanVideo's dual- and single-stream blocks under sequence
    parallelism (exact) or displaced patches (shard.displaced)."""

    def __init__(self, shard: SequenceShard):
        self.shard = shard

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        q, k, v, tq, tk, tv = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        shard, text_valid = self.shard, self.shard.cache["text_valid"]
        if shard.displaced is not None:
            out, text_out = displaced_joint_attention(q, k, v, tq, tk, tv, kv=shard.displaced, key=id(attn),
                                                      valid_len=shard.valid_len, text_valid=text_valid,
                                                      groups=shard.attention)
        else:
            out, text_out = parallel_joint_attention(q, k, v, tq, tk, tv, groups=shard.attention,
                                                     valid_len=shard.valid_len, text_valid=text_valid)
        return _joint_out(attn, out, text_out, q.dtype)


class HunyuanStageAttention:
    """Processor for the `attn` of a PipeFusion stage's blocks: the current patch's video queries
    and its copy of the text against the layer's whole-sequence video K/V buffer (this patch
    fresh) and the patch's text K/V."""

    def __init__(self, stage: PipeStage):
        self.stage = stage

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        q, k, v, tq, tk, tv = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        keys, values = self.stage.refresh(id(attn), k, v)
        out, text_out = joint_over(q, keys, values, tq, tk, tv, text_valid=self.stage.cache["text_valid"])
        return _joint_out(attn, out, text_out, q.dtype)


def _text_valid(mask: torch.Tensor, video_len: int) -> int:
    """Real text tokens from the transformer's joint mask (B, 1, 1, video + text): the pipeline
    pads each prompt at the end, and a forward carries one prompt's branch."""
    counts = mask.reshape(mask.shape[0], -1)[:, video_len:].sum(dim=1)
    if not torch.all(counts == counts[0]):
        raise ValueError("sequence parallelism needs the same text length for every sample of a batch")
    return int(counts[0])


def sequence_parallel_plan(transformer, shard: SequenceShard, handle: Handle) -> None:
    blocks = [block for attr in BLOCK_LISTS for block in getattr(transformer, attr)]

    def split_inputs(module, args):
        hidden, text, temb, mask, rope, *rest = args
        shard.cache["text_valid"] = _text_valid(mask, hidden.shape[1])
        hidden = shard.split(hidden, dim=1, record=True)
        rope = tuple(shard.split(t, dim=0) for t in rope)
        shard.cache["rope"] = rope
        return (hidden, text, temb, mask, rope, *rest)

    def reuse_inputs(module, args):
        hidden, text, temb, mask, _, *rest = args
        return (hidden, text, temb, mask, shard.cache["rope"], *rest)

    def gather_output(module, args, output):
        shard.cache.clear()
        hidden, text = output
        return shard.gather(hidden, dim=1), text

    install_split_gather(handle, blocks, split=split_inputs, reuse=reuse_inputs, gather=gather_output,
                         attention="attn", processor=HunyuanJointAttention(shard))


def pipefusion_plan(transformer, stage: PipeStage):
    """Both block lists form one pipeline (dual-stream blocks first); the text stream is carried
    with every patch. The blocks' arguments: (hidden, text, temb, mask, rope, token_replace_emb,
    first_frame_num_tokens); rope tables are (tokens, dim)."""

    def prepare(args):
        hidden, text, *rest = args
        stage.cache["text_valid"] = _text_valid(rest[1], hidden.shape[1])
        return hidden, (text,), tuple(rest)

    def call(block, x, carried, rest):
        x, text = block(x, carried[0], *rest)
        return x, (text,)

    def slice_rest(rest, start, end):
        temb, mask, rope, *more = rest
        return (temb, mask, tuple(t[start:end] for t in rope), *more)

    def install(blocks, stage):
        for block in blocks:
            block.attn.set_processor(HunyuanStageAttention(stage))

    # The text after the last block is unused by the transformer's head: the input text stands in.
    calls = BlockCalls(prepare=prepare, call=call, slice_rest=slice_rest, finish=lambda hidden, args: (hidden, args[1]))
    return apply_pipefusion(transformer, attrs=BLOCK_LISTS, stage=stage, calls=calls, install_attention=install)
