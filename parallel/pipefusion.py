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
The pipeline refills every step (the next step's input needs this step's scheduler update), so
a step costs about (patches + stages - 1) / patches of one stage's share of the compute.
K/V buffers are kept per layer and guidance branch; only a stage's own layers have buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from unison.parallel.attention import sdpa
from unison.parallel.comm import CommStats


def stage_blocks(blocks: int, stages: int, index: int) -> range:
    """The contiguous blocks of stage `index` (sizes differ by at most one)."""
    return range(blocks * index // stages, blocks * (index + 1) // stages)


def patch_ranges(length: int, patches: int) -> list[tuple[int, int]]:
    bounds = [length * i // patches for i in range(patches + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class PipeStage:
    """This rank's stage of one transformer, and its stale K/V per (branch, layer)."""

    group: object
    size: int
    index: int
    warmup_steps: int
    patches: int
    stats: CommStats | None = None
    step: int = 0
    branch: str = "cond"
    buffers: dict = field(default_factory=dict)
    filled: dict = field(default_factory=dict)
    """branch -> sequence length of its last whole-sequence (warm) pass: buffers are complete."""
    span: tuple[int, int, int] = (0, 0, 0)
    """(start, end, sequence length) of the patch the stage's blocks are running."""

    def begin_step(self, index: int) -> None:
        self.step = index

    def reset(self) -> None:
        self.buffers.clear()
        self.filled.clear()

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.buffers.values() for t in kv)

    def attend(self, key, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v of the current patch (batch, tokens, heads, head_dim): refresh the layer's
        buffer at the patch's positions and attend to the whole sequence."""
        start, end, length = self.span
        buffer = self.buffers.get((self.branch, key))
        if buffer is None or buffer[0].shape[1] != length:
            shape = (k.shape[0], length, *k.shape[2:])
            buffer = self.buffers[(self.branch, key)] = [k.new_zeros(shape), v.new_zeros(shape)]
        buffer[0][:, start:end] = k
        buffer[1][:, start:end] = v
        return sdpa(q, buffer[0], buffer[1])

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, self.index + offset)

    def _count(self, kind: str, t: torch.Tensor, copies: int = 1) -> None:
        if self.stats is not None:
            self.stats.add(kind, t.numel() * t.element_size() * copies)


class StageRunner(torch.nn.Module):
    """Stands in for the whole block list: runs this stage's blocks on every patch, passing
    patches to the next stage, and returns the full output on every rank."""

    def __init__(self, blocks: list[torch.nn.Module], stage: PipeStage,
                 slice_args: Callable[[tuple, int, int], tuple]):
        super().__init__()
        self.local = torch.nn.ModuleList(blocks)
        self.stage, self.slice_args = stage, slice_args

    def forward(self, hidden: torch.Tensor, *rest):
        stage = self.stage
        length = hidden.shape[1]
        warm = stage.step < stage.warmup_steps or stage.filled.get(stage.branch) != length
        ranges = [(0, length)] if warm else patch_ranges(length, stage.patches)
        first, last = stage.index == 0, stage.index == stage.size - 1
        outputs, sends = [], []
        for a, b in ranges:
            if first:
                x = hidden[:, a:b]
            else:
                x = hidden.new_empty((hidden.shape[0], b - a, *hidden.shape[2:]))
                dist.recv(x, src=stage._peer(-1), group=stage.group)
            stage.span = (a, b, length)
            args = self.slice_args(rest, a, b)
            for block in self.local:
                x = block(x, *args)
            if last:
                outputs.append(x)
            else:
                x = x.contiguous()
                sends.append((dist.isend(x, dst=stage._peer(1), group=stage.group), x))
                stage._count("p2p", x)
        for request, _ in sends:
            request.wait()
        if warm:
            stage.filled[stage.branch] = length
        full = torch.cat(outputs, dim=1) if last else torch.empty_like(hidden)
        dist.broadcast(full, src=stage._peer(stage.size - 1 - stage.index), group=stage.group)
        if last:
            stage._count("broadcast", full, stage.size - 1)
        return full


def apply_pipefusion(transformer: torch.nn.Module, *, attr: str, stage: PipeStage,
                     slice_args: Callable[[tuple, int, int], tuple],
                     install_attention: Callable[[list[torch.nn.Module], PipeStage], None]) -> StageRunner:
    """Keep this stage's blocks of `transformer.<attr>` (the rest are dropped, freeing their
    weights) behind one StageRunner; `install_attention` sets the stage's self-attention
    processors. Not undoable: the dropped blocks are gone."""
    if getattr(transformer, "_unison_pipefusion", False):
        raise RuntimeError("PipeFusion is already applied to this transformer")
    blocks = list(getattr(transformer, attr))
    if len(blocks) < stage.size:
        raise ValueError(f"PipeFusion needs at least one block per stage: {len(blocks)} blocks, {stage.size} stages")
    mine = [blocks[i] for i in stage_blocks(len(blocks), stage.size, stage.index)]
    install_attention(mine, stage)
    runner = StageRunner(mine, stage, slice_args)
    setattr(transformer, attr, torch.nn.ModuleList([runner]))
    transformer._unison_pipefusion = True
    return runner
