"""PipeFusion for video DiTs: the blocks split into stages across the patch group (each rank
holds about 1/N of the block weights), and the token sequence streams through the stages in
patches, each attending to one-step-stale K/V of the patches not yet refreshed this step.

Every rank runs the transformer's forward: the embeddings before the blocks and the head after
them are replicated (small); the block list is replaced by one `StageRunner` that
- in a warm-up step (the first `warmup_steps`, and the first time a layer runs) passes the whole
  sequence through the stages as one patch: every block sees fresh K/V, so the step equals one
  rank;
- afterwards splits the sequence into `patches` contiguous ranges. Stage 0 starts patch 0, sends
  it on and starts patch 1 while stage 1 works on patch 0, and so on. A stage's self-attention
  for patch m writes m's fresh K/V into the layer's full-sequence buffer and attends to all of
  it: patches before m are fresh (refreshed earlier in this step), later ones are from the
  previous step;
- the last stage assembles the output and broadcasts it over the group, so every rank applies the
  head and the scheduler to the same tensor.
A stream that the blocks update beside the tokens but that is not split (HunyuanVideo's text)
travels whole with each patch: each patch carries its own copy of the text through the stages,
and that copy attends to what its patch's blocks see. In a warm-up step there is one patch and
one copy, so the step stays exact; afterwards the copies are part of the approximation. (Every
layer lives on exactly one rank, so no replicated copy can drift between ranks.)
The pipeline refills every step (the next step's input needs this step's scheduler update), so
a step costs about (patches + stages - 1) / patches of one stage's share of the compute.
K/V buffers are kept per layer and guidance branch; only a stage's own layers have buffers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from unison.parallel.attention import AttentionGroups, KVSource
from unison.parallel.sequence import TokenPlan
from unison.parallel.stale import StaleKV


def stage_blocks(costs: list[float], stages: int, index: int) -> range:
    """The contiguous blocks of stage `index`, balanced by per-block cost. Each boundary is the
    block edge whose cumulative cost is nearest the stage's share (the earlier edge on a tie),
    with at least one block per stage; equal costs give sizes that differ by at most one."""
    prefix, edges = list(itertools.accumulate(costs)), [0]
    total = prefix[-1]
    for i in range(1, stages):
        target = total * i / stages
        lowest, highest = edges[-1] + 1, len(costs) - (stages - i)
        edges.append(min(range(lowest, highest + 1), key=lambda k: (abs(prefix[k - 1] - target), k)))
    edges.append(len(costs))
    return range(edges[index], edges[index + 1])


def patch_ranges(length: int, patches: int) -> list[tuple[int, int]]:
    bounds = [length * i // patches for i in range(patches + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass(kw_only=True)
class PipeStage(StaleKV):
    """This rank's stage of one transformer, and its stale K/V per (branch, layer)."""

    patches: int
    """Patches per step after the warm-up."""
    filled: dict = field(default_factory=dict)
    """branch -> sequence length of its last whole-sequence (warm) pass: buffers are complete."""
    span: tuple[int, int, int] = (0, 0, 0)
    """(start, end, sequence length) of the patch the stage's blocks are running."""
    cache: dict = field(default_factory=dict)
    """Per-forward values the stage's attention needs (HunyuanVideo: the real text length)."""
    backend: str = "auto"
    """parallel.attention_backend: the local kernel."""

    def reset(self) -> None:
        super().reset()
        self.filled.clear()

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.buffers.values() for t in kv)

    def refresh(self, key, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """k, v of the current patch (batch, tokens, heads, head_dim) written into the layer's
        whole-sequence buffer at the patch's positions; returns the buffer [K, V]."""
        start, end, length = self.span
        buffer = self.buffers.get((self.branch, key))
        if buffer is None or buffer[0].shape[1] != length:
            shape = (k.shape[0], length, *k.shape[2:])
            buffer = self.buffers[(self.branch, key)] = [k.new_zeros(shape), v.new_zeros(shape)]
        buffer[0][:, start:end] = k
        buffer[1][:, start:end] = v
        return buffer

    def source(self, key) -> KVSource:
        """The layer's whole-sequence K/V for `sequence_attention` (its `kv` argument): the
        buffer with the current patch's K/V refreshed."""
        return lambda k, v, attend: attend(*self.refresh(key, k, v))

    def attention(self) -> AttentionGroups:
        """No groups inside a stage (its attention is local): just the local kernel."""
        return AttentionGroups(backend=self.backend)

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, self.index + offset)



@dataclass(frozen=True)
class BlockCalls:
    """How a family's blocks are called, for the StageRunner (which stands in for the block list).

    `prepare(args)` splits the block list's inputs into (hidden, carried, rest): `hidden` is
    streamed in patches, `carried` (a tuple; HunyuanVideo's text stream) goes whole with every
    patch and is updated by each block, `rest` is the blocks' other inputs. `call(block, x,
    carried, rest)` runs one block and returns (x, carried). `slice_rest(rest, start, end)`: the
    other inputs for tokens [start, end). `finish(hidden, args)`: what the block list returns."""

    prepare: Callable[[tuple], tuple[torch.Tensor, tuple, tuple]]
    call: Callable[[torch.nn.Module, torch.Tensor, tuple, tuple], tuple[torch.Tensor, tuple]]
    slice_rest: Callable[[tuple, int, int], tuple]
    finish: Callable[[torch.Tensor, tuple], object]


class FirstBlockGate(Protocol):
    """First-Block Cache for a pipelined transformer (caching/fbcache.py implements it). Stage 0
    holds the first block: it runs it on the whole sequence and passes its residual; the other
    stages pass an empty residual (they add nothing to the agreed sums)."""

    def decide(self, residual: torch.Tensor, head: torch.Tensor | None) -> bool:
        """Collective over the deciding group: compute (True) or reuse the cached residual."""

    def skipped(self, head: torch.Tensor) -> torch.Tensor:
        """Stage 0, on a skipped step: the output from the first block's and the cached residual."""

    def computed(self, output: torch.Tensor) -> None:
        """Stage 0, on a computed step: the blocks' whole output (to cache its residual)."""


class StageRunner(torch.nn.Module):
    """Stands in for the whole block list: runs this stage's blocks on every patch, passing
    patches to the next stage, and returns the full output on every rank.

    With a First-Block Cache gate, stage 0 first runs block 0 on the whole sequence (its K/V are
    all fresh: that block is exact), every rank agrees whether to compute, and on a skipped step
    stage 0 adds the cached residual and broadcasts the result: no other stage runs a block, and
    the stale K/V buffers of blocks 1.. keep the last computed step's values, which is what the
    next computed step sees."""

    def __init__(self, blocks: list[torch.nn.Module], stage: PipeStage, calls: BlockCalls, *, total_blocks: int):
        super().__init__()
        self.local = torch.nn.ModuleList(blocks)
        self.stage, self.calls, self.total_blocks = stage, calls, total_blocks
        self.gate: FirstBlockGate | None = None

    def forward(self, *args):
        stage, calls = self.stage, self.calls
        hidden, carried, rest = calls.prepare(args)
        length = hidden.shape[1]
        first, last = stage.index == 0, stage.index == stage.size - 1
        blocks = list(self.local)
        if self.gate is not None:
            head = None
            if first:
                stage.span = (0, length, length)
                head, carried = calls.call(blocks[0], hidden, carried, calls.slice_rest(rest, 0, length))
                blocks = blocks[1:]
            if not self.gate.decide(head - hidden if first else hidden[:, :0], head):
                full = self.gate.skipped(head).contiguous() if first else hidden.new_empty(hidden.shape)
                dist.broadcast(full, src=stage._peer(-stage.index), group=stage.group)
                if first:
                    stage._count("broadcast", full, stage.size - 1)
                return calls.finish(full, args)
            if first:
                hidden = head
        warm = stage.step < stage.warmup_steps or stage.filled.get(stage.branch) != length
        ranges = [(0, length)] if warm else patch_ranges(length, stage.patches)
        outputs, sends = [], []
        for a, b in ranges:
            if first:
                x, carry = hidden[:, a:b], carried
            else:
                x = hidden.new_empty((hidden.shape[0], b - a, *hidden.shape[2:]))
                carry = tuple(t.new_empty(t.shape) for t in carried)
                for t in (x, *carry):
                    dist.recv(t, src=stage._peer(-1), group=stage.group)
            stage.span = (a, b, length)
            patch_rest = calls.slice_rest(rest, a, b)
            for block in blocks:
                x, carry = calls.call(block, x, carry, patch_rest)
            if last:
                outputs.append(x)
                continue
            for t in (x, *carry):
                t = t.contiguous()
                sends.append((dist.isend(t, dst=stage._peer(1), group=stage.group), t))
                stage._count("p2p", t)
        for request, _ in sends:
            request.wait()
        if warm:
            stage.filled[stage.branch] = length
        # new_empty, not empty_like: a collective fills contiguous memory, and hidden may be a view
        full = torch.cat(outputs, dim=1) if last else hidden.new_empty(hidden.shape)
        dist.broadcast(full, src=stage._peer(stage.size - 1 - stage.index), group=stage.group)
        if last:
            stage._count("broadcast", full, stage.size - 1)
        if self.gate is not None and first:
            self.gate.computed(full)
        return calls.finish(full, args)


def block_calls(plan: TokenPlan) -> BlockCalls:
    """How the StageRunner calls the blocks of a family, from its TokenPlan: the token stream is
    argument 0 and streamed in patches, the `carried` streams go whole with every patch and come
    back from each block after the tokens, the `splits` are sliced to the patch's tokens."""

    def prepare(args: tuple):
        return args[0], tuple(args[i] for i in plan.carried), tuple(args)

    def call(block, x, carried, rest):
        args = list(rest)
        args[0] = x
        for i, value in zip(plan.carried, carried):
            args[i] = value
        out = block(*args)
        return (out[0], tuple(out[1:])) if plan.carried else (out, ())

    def slice_rest(rest: tuple, start: int, end: int) -> tuple:
        args = list(rest)
        for i, rule in plan.splits.items():
            args[i] = rule.apply(args[i], lambda t, dim: t.narrow(dim, start, end - start))
        if plan.adjust is not None:
            plan.adjust(args, start, end)
        return tuple(args)

    def finish(hidden, args):
        # A carried stream after the last block is unused by the transformer's head (HunyuanVideo's
        # text): its input stands in.
        return (hidden, *(args[i] for i in plan.carried)) if plan.carried else hidden

    return BlockCalls(prepare=prepare, call=call, slice_rest=slice_rest, finish=finish)


def apply_pipefusion(transformer: torch.nn.Module, plan: TokenPlan, stage: PipeStage) -> StageRunner:
    """Keep this stage's blocks of `plan`'s block lists (concatenated in execution order; the rest
    are dropped, freeing their weights) behind one StageRunner, which takes the first list's place
    (the others become empty), with the plan's stage processors. Not undoable: the dropped blocks
    are gone (nor is the plan's `watch` hook removed)."""
    if getattr(transformer, "_unison_pipefusion", False):
        raise RuntimeError("PipeFusion is already applied to this transformer")
    attrs = plan.blocks
    blocks = plan.block_list(transformer)
    if len(blocks) < stage.size:
        raise ValueError(f"PipeFusion needs at least one block per stage: {len(blocks)} blocks, {stage.size} stages")
    # Equal cost per block, not parameters: at the sequence lengths PipeFusion is for, attention
    # (the same in every block) dominates. HunyuanVideo's dual-stream blocks hold 2.4x the
    # parameters of its single-stream ones but cost about 1.2x at 720p, and equal counts also
    # give every stage the same K/V buffers.
    mine = [blocks[i] for i in stage_blocks([1.0] * len(blocks), stage.size, stage.index)]
    for block in mine:
        getattr(block, plan.attention).set_processor(plan.staged(stage))
    runner = StageRunner(mine, stage, block_calls(plan), total_blocks=len(blocks))
    for i, attr in enumerate(attrs):
        setattr(transformer, attr, torch.nn.ModuleList([runner] if i == 0 else []))
    transformer._unison_pipefusion = True
    if plan.watch is not None:
        plan.watch(transformer, stage.cache)
    return runner
