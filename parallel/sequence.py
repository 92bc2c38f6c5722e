"""Splitting a transformer's token sequence across ranks and gathering it back.

A model family says where to split and gather (its plan installs the hooks); this module owns
the mechanics: pad to a multiple of the degree, take this rank's chunk, remember the real
length so attention never sees padding, gather and trim at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from unison.parallel.attention import AttentionGroups
from unison.parallel.comm import CommStats, all_gather


@dataclass
class SequenceShard:
    """This rank's place in its sequence-parallel group, and per-forward state."""

    attention: AttentionGroups
    group: object | None
    size: int
    index: int
    stats: CommStats | None = None
    valid_len: int = 0
    """Unpadded sequence length of the current forward (set when the sequence is split)."""
    cache: dict = field(default_factory=dict)
    """Per-forward split tensors that every block needs (rotary tables, per-token modulation)."""
    displaced: object | None = None
    """Patch parallelism: the DisplacedKV self-attention exchanges stale K/V through (None under
    exact sequence parallelism)."""

    def split(self, x: torch.Tensor, *, dim: int = 1, record: bool = False) -> torch.Tensor:
        length = x.shape[dim]
        if record:
            self.valid_len = length
        chunk = -(-length // self.size)
        pad = chunk * self.size - length
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.index * chunk, chunk)

    def local_valid(self) -> int:
        """Real (unpadded) tokens at the start of this rank's shard of the current forward."""
        chunk = -(-self.valid_len // self.size)
        return max(0, min(chunk, self.valid_len - self.index * chunk))

    def gather(self, x: torch.Tensor, *, dim: int = 1) -> torch.Tensor:
        full = all_gather(x, dim=dim, group=self.group, stats=self.stats)
        return full.narrow(dim, 0, self.valid_len)


@dataclass
class Handle:
    """Undo for an applied transformation."""

    undo: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


def install_split_gather(handle: Handle, blocks: list[torch.nn.Module], *, split, reuse, gather,
                         attention: str, processor) -> None:
    """The hooks every family's plan installs: `split` as a pre-hook on the first block, `reuse`
    on the others (per-forward split tensors), `gather` as a forward hook on the last block, and
    `processor` on each block's `attention` module. Adds the undo of all of it to `handle`."""
    hooks = [blocks[0].register_forward_pre_hook(split)]
    hooks += [block.register_forward_pre_hook(reuse) for block in blocks[1:]]
    hooks.append(blocks[-1].register_forward_hook(gather))
    originals = [getattr(block, attention).processor for block in blocks]
    for block in blocks:
        getattr(block, attention).set_processor(processor)

    def undo():
        for hook in hooks:
            hook.remove()
        for block, original in zip(blocks, originals):
            getattr(block, attention).set_processor(original)

    handle.undo.append(undo)


_MARK = "_unison_sequence_parallel"


def apply_sequence_parallel(transformer: torch.nn.Module, plan: Callable[[torch.nn.Module, SequenceShard, Handle],
                            None], shard: SequenceShard) -> Handle:
    """Install `plan`'s hooks on `transformer`; applying twice is an error; Handle.remove() undoes."""
    if getattr(transformer, _MARK, False):
        raise RuntimeError("sequence parallelism is already applied to this transformer")
    handle = Handle()
    plan(transformer, shard, handle)
    setattr(transformer, _MARK, True)
    handle.undo.insert(0, lambda: setattr(transformer, _MARK, False))
    return handle
