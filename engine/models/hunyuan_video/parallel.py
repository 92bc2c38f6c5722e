"""Where HunyuanVideo's sequence is split and gathered, and its joint attention under sequence
parallelism, displaced patches and PipeFusion.

Video tokens are split at the first dual-stream block's input (with the rotary tables) and
gathered after the last single-stream block, so patch embedding, RoPE tables, timestep and
guidance embeddings, the output norm and projection see exactly what they see on one rank. Text
tokens stay whole on every rank: the token refiner runs locally, and in every block each rank
carries the full text stream. Under exact sequence parallelism joint attention makes every
rank's text output identical (see parallel/attention.py sequence_attention), so the replicated
text never drifts between ranks. Under patch parallelism each patch carries its own copy of the
text (see DisplacedKV.source and parallel/pipefusion.py): exact in warm-up, part of the measured
approximation afterwards. The text stream leaves the blocks unused (the output head reads only
the video tokens).

Image-to-video with image_condition_type token_replace: the blocks modulate the leading tokens of
their input that belong to the first latent frame (the picture's) differently from the rest, and
take their count as an argument. Each rank (each patch, under PipeFusion) gets the count of those
tokens that lie in its own span: all, some, or none of its tokens.
"""

from __future__ import annotations

import weakref

import torch

from unison.parallel.attention import sequence_attention
from unison.parallel.pipefusion import PipeStage
from unison.parallel.sequence import SequenceShard, Split, TokenPlan

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
        out, text_out = _attend_across(self.shard, attn, q, k, v, tq, tk, tv)
        return _joint_out(attn, out, text_out, q.dtype)


@torch.compiler.disable
def _attend_across(shard: SequenceShard, attn, q, k, v, tq, tk, tv) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of the processor that communicates and reads per-forward state (valid video and
    text lengths, stale K/V keyed by layer): never traced, so under model.compile=blocks it runs
    eagerly between the compiled projections and output (engine/compile.py)."""
    kv = shard.displaced.source(id(attn)) if shard.displaced is not None else None
    return sequence_attention(q, k, v, groups=shard.attention, valid_len=shard.valid_len, text=(tq, tk, tv),
                              text_valid=shard.cache["text_valid"], kv=kv)


class HunyuanStageAttention:
    """Processor for the `attn` of a PipeFusion stage's blocks: the current patch's video queries
    and its copy of the text against the layer's whole-sequence video K/V buffer (this patch
    fresh) and the patch's text K/V."""

    def __init__(self, stage: PipeStage):
        self.stage = stage

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        q, k, v, tq, tk, tv = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out, text_out = _attend_stage(self.stage, attn, q, k, v, tq, tk, tv)
        return _joint_out(attn, out, text_out, q.dtype)


@torch.compiler.disable
def _attend_stage(stage: PipeStage, attn, q, k, v, tq, tk, tv) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage's K/V buffer update and joint attention: never traced (the current patch's span,
    the buffers and the text length are per-forward state), like _attend_across."""
    return sequence_attention(q, k, v, groups=stage.attention(), valid_len=stage.span[2], text=(tq, tk, tv),
                              text_valid=stage.cache["text_valid"], kv=stage.source(id(attn)))


class TextLengths:
    """Real text tokens of the prompt mask a forward gets (`encoder_attention_mask`, (B, T); the
    pipeline pads each prompt at the end, and a forward carries one prompt's branch).

    Slicing the text keys needs the count on the host, and reading it from the device is a host
    synchronisation. The loop passes the same mask tensor to every step of a branch, so the count
    is read once per mask (the first step of each branch of a video), in a pre-hook of the whole
    transformer, before any block; never on later steps, never inside the blocks."""

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, int, int]] = {}

    def __call__(self, mask: torch.Tensor) -> int:
        entry = self._seen.get(id(mask))
        if entry is not None and entry[0]() is mask and entry[1] == mask._version:
            return entry[2]
        counts = self.count(mask)
        if len(set(counts)) > 1:
            raise ValueError("sequence parallelism needs the same text length for every sample of a batch")
        self._seen = {key: e for key, e in self._seen.items() if e[0]() is not None}
        self._seen[id(mask)] = (weakref.ref(mask), mask._version, counts[0])
        return counts[0]

    def count(self, mask: torch.Tensor) -> list[int]:
        """Each sample's real tokens, read to the host (a subclass counts other inputs)."""
        return mask.sum(dim=1, dtype=torch.int).tolist()  # as the transformer counts it for its joint mask


def _record_text_length(transformer, cache: dict) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on the transformer that puts the forward's real text length in `cache`."""
    lengths = TextLengths()

    def hook(module, args, kwargs):
        mask = kwargs["encoder_attention_mask"] if "encoder_attention_mask" in kwargs else args[3]
        cache["text_valid"] = lengths(mask)

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _first_frame_tokens(first: int, *, start: int, end: int) -> int:
    """How many of the tokens start:end of the video sequence belong to the first latent frame
    (its `first` tokens lead the sequence). Under image_condition_type token_replace the blocks
    modulate that many leading tokens of their input with timestep 0 (token_replace_emb)."""
    return max(0, min(end, first) - start)


def _token_replace(args: list, start: int, end: int) -> None:
    """image_condition_type token_replace (I2V): the first frame's tokens among start:end."""
    if len(args) == 7 and args[5] is not None:
        args[6] = _first_frame_tokens(args[6], start=start, end=end)


TOKEN_PLAN = TokenPlan(
    blocks=BLOCK_LISTS, attention="attn", exact=HunyuanJointAttention, staged=HunyuanStageAttention,
    # The blocks take (hidden, text, temb, mask, rope, token_replace_emb, first_frame_num_tokens) and
    # return (hidden, text); the rotary tables are (tokens, dim).
    splits={4: Split(dim=0, each=True)}, reused=(4, 5, 6), carried=(1,), adjust=_token_replace,
    watch=_record_text_length)
"""Both block lists in one sequence (dual-stream blocks first), the text stream carried whole."""
