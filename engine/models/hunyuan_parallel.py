"""Where HunyuanVideo's sequence is split and gathered, and its joint attention under sequence
parallelism.

Video tokens are split at the first dual-stream block's input (with the rotary tables) and
gathered after the last single-stream block, so patch embedding, RoPE tables, timestep and
guidance embeddings, the output norm and projection see exactly what they see on one rank. Text
tokens stay whole on every rank: the token refiner runs locally, and in every block each rank
carries the full text stream. Joint attention makes every rank's text output identical (see
parallel_joint_attention), so the replicated text never drifts between ranks.
"""

from __future__ import annotations

import torch

from unison.parallel.attention import parallel_joint_attention
from unison.parallel.sequence import Handle, SequenceShard, install_split_gather


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


class HunyuanJointAttention:
    """Processor for the `attn` of HunyuanVideo's dual-stream blocks (text has its own
    projections: add_q_proj…) and single-stream blocks (text goes through the same projections)."""

    def __init__(self, shard: SequenceShard):
        self.shard = shard

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        video, text = hidden_states, encoder_hidden_states
        q, k, v = (_heads(proj(video), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        dual = attn.add_q_proj is not None
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if dual else (attn.to_q, attn.to_k, attn.to_v)
        tq, tk, tv = (_heads(proj(text), attn.heads) for proj in projections)
        tq, tk = (attn.norm_added_q(tq), attn.norm_added_k(tk)) if dual else (attn.norm_q(tq), attn.norm_k(tk))
        out, text_out = parallel_joint_attention(q, k, v, tq, tk, tv, groups=self.shard.attention,
                                                 valid_len=self.shard.valid_len,
                                                 text_valid=self.shard.cache["text_valid"])
        out, text_out = out.flatten(2, 3).to(q.dtype), text_out.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def _text_valid(mask: torch.Tensor, video_len: int) -> int:
    """Real text tokens from the transformer's joint mask (B, 1, 1, video + text): the pipeline
    pads each prompt at the end, and a forward carries one prompt's branch."""
    counts = mask.reshape(mask.shape[0], -1)[:, video_len:].sum(dim=1)
    if not torch.all(counts == counts[0]):
        raise ValueError("sequence parallelism needs the same text length for every sample of a batch")
    return int(counts[0])


def sequence_parallel_plan(transformer, shard: SequenceShard, handle: Handle) -> None:
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

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
