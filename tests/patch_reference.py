"""An independent single-process reference for patch parallelism's stale K/V rules (tests only).

One process computes every patch of a Wan transformer itself. The unmodified diffusers
transformer runs the whole token sequence; this module's processor, set on every block's
self-attention (attn1), lets each patch's queries attend to keys and values that mix the layer's
K/V of this step and of the previous step (same guidance branch) by a rule:

- displaced patches (DistriFusion): patch m sees its own K/V fresh and every other patch's from
  the previous step;
- PipeFusion: patch m sees this step's K/V of patches 0..m (they passed the layer before it) and
  the previous step's of the rest.

In the first `warmup_steps` steps, and the first time a layer runs in a branch (there is no
previous step then), every patch sees fresh K/V. Everything else in a Wan block (norms,
modulation, cross-attention to the text, feed-forward) acts on each token alone, so running the
whole sequence at once computes exactly what running the patches apart does.

It shares no code with unison.parallel or the engine's attention processors: the projections are
the attention module's own layers, and the rotary embedding and the attention are written here
as diffusers' WanAttnProcessor writes them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F


def split_like_sequence_parallel(length: int, patches: int) -> list[tuple[int, int]]:
    """Displaced patches: equal chunks of ceil(length / patches) tokens, the last one short (the
    engine pads it)."""
    chunk = -(-length // patches)
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def split_by_floor(length: int, patches: int) -> list[tuple[int, int]]:
    """PipeFusion: patch i is tokens [length * i // patches, length * (i + 1) // patches)."""
    return [(length * i // patches, length * (i + 1) // patches) for i in range(patches)]


@dataclass(frozen=True)
class Rule:
    """Which patches a layer splits the sequence into, and whether patch m's queries see patch
    j's K/V of this step (`sees_fresh(m, j)`) or of the previous one."""

    split: Callable[[int, int], list[tuple[int, int]]]
    sees_fresh: Callable[[int, int], bool]


DISPLACED = Rule(split=split_like_sequence_parallel, sees_fresh=lambda m, j: j == m)
PIPEFUSION = Rule(split=split_by_floor, sees_fresh=lambda m, j: j <= m)


@dataclass
class _State:
    rule: Rule
    patches: int
    warmup_steps: int
    branches: int
    forwards: int = 0
    """Transformer forwards so far: the engine's loop runs the branches of a step in turn."""
    previous: dict = field(default_factory=dict)
    """(branch, layer) -> that layer's whole-sequence (K, V) of the last step it ran."""

    @property
    def step(self) -> int:
        return (self.forwards - 1) // self.branches

    @property
    def branch(self) -> int:
        return (self.forwards - 1) % self.branches

    def count_forward(self, module, args, kwargs) -> None:
        self.forwards += 1


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: pairs (x[2i], x[2i+1]) turned by frequency i's angle."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) in and out."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class _StaleSelfAttention:
    """attn1 processor of one block: Wan's self-attention with the rule's mix of K/V."""

    def __init__(self, state: _State, layer: int):
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        state = self.state
        key = (state.branch, self.layer)
        stale = state.previous.get(key)
        state.previous[key] = (k, v)
        if stale is None or state.step < state.warmup_steps:
            out = _attention(q, k, v)
        else:
            ranges = state.rule.split(q.shape[1], state.patches)
            outputs = []
            for m, (a, b) in enumerate(ranges):
                seen = [(k, v) if state.rule.sees_fresh(m, j) else stale for j in range(len(ranges))]
                keys = torch.cat([ks[:, c:d] for (ks, _), (c, d) in zip(seen, ranges)], dim=1)
                values = torch.cat([vs[:, c:d] for (_, vs), (c, d) in zip(seen, ranges)], dim=1)
                outputs.append(_attention(q[:, a:b], keys, values))
            out = torch.cat(outputs, dim=1)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def stale_attention(transformer, *, rule: Rule, patches: int, warmup_steps: int, branches: int) -> Iterator[None]:
    """Within the block, `transformer` (a diffusers WanTransformer3DModel, run by a loop that
    calls it `branches` times per step) computes `rule`'s approximation for `patches` patches."""
    state = _State(rule=rule, patches=patches, warmup_steps=warmup_steps, branches=branches)
    originals = [block.attn1.processor for block in transformer.blocks]
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(_StaleSelfAttention(state, layer))
    hook = transformer.register_forward_pre_hook(state.count_forward, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        for block, processor in zip(transformer.blocks, originals):
            block.attn1.set_processor(processor)
