"""Splitting a transformer's token sequence across ranks and gathering it back.

A model family says where to split and gather as data (`TokenPlan`, in the spirit of diffusers'
`_cp_plan`): which block lists, which of the blocks' positional arguments are split with the
tokens and along which dimension, which stream the blocks carry beside the tokens, and the
attention processors (code, where data cannot say it). This module owns the mechanics: pad to a
multiple of the degree, take this rank's chunk, remember the real length so attention never sees
padding, gather and trim at the end. PipeFusion (parallel/pipefusion.py) reads the same plan.
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


@dataclass(frozen=True)
class Split:
    """One positional block argument split with the tokens."""

    dim: int
    """The token dimension."""
    each: bool = False
    """The argument is a tuple of tensors (rotary tables), each split."""
    when: Callable[[torch.Tensor], bool] | None = None
    """Split only where this says the tensor is per token (else it is the same for every token)."""

    def apply(self, value, cut: Callable[[torch.Tensor, int], torch.Tensor]):
        if self.each:
            return tuple(cut(t, self.dim) for t in value)
        if self.when is not None and not self.when(value):
            return value
        return cut(value, self.dim)


@dataclass(frozen=True)
class TokenPlan:
    """Where a family's sequence is split and gathered: at the first block's input, after the
    last block's output, so that everything outside the blocks (embeddings, RoPE tables, the
    output head) sees what it sees on one rank. Argument 0 of every block is the token stream."""

    blocks: tuple[str, ...]
    """Transformer attributes holding the block lists, in execution order."""
    attention: str
    """Each block's self-attention (or joint attention) module, whose processor is replaced."""
    exact: Callable[["SequenceShard"], object]
    """The processor under sequence parallelism or displaced patches, for a shard."""
    staged: Callable[[object], object] | None = None
    """The processor of a PipeFusion stage's blocks, for a PipeStage (None: no PipeFusion)."""
    splits: dict[int, Split] = field(default_factory=dict)
    """Other arguments split with the tokens, by position."""
    reused: tuple[int, ...] = ()
    """Arguments split (or adjusted) once at the first block and handed to the others as they are."""
    carried: tuple[int, ...] = ()
    """Streams the blocks update beside the tokens and return after them (never split)."""
    adjust: Callable[[list, int, int], None] | None = None
    """(args, start, end): what data cannot say about a block's arguments for tokens start:end."""
    watch: Callable[[torch.nn.Module, dict], object] | None = None
    """(transformer, per-forward cache) -> a removable pre-hook that records what the processors
    read per forward (HunyuanVideo's real text length)."""

    def block_list(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [block for attr in self.blocks for block in getattr(transformer, attr)]


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


def apply_sequence_parallel(transformer: torch.nn.Module, plan: TokenPlan, shard: SequenceShard) -> Handle:
    """Install `plan`'s split and gather on `transformer` for `shard`; applying twice is an
    error; Handle.remove() undoes."""
    if getattr(transformer, _MARK, False):
        raise RuntimeError("sequence parallelism is already applied to this transformer")
    handle = Handle()
    if plan.watch is not None:
        handle.undo.append(plan.watch(transformer, shard.cache).remove)

    def split_inputs(module, args):
        args = list(args)
        args[0] = shard.split(args[0], dim=1, record=True)
        for i, rule in plan.splits.items():
            args[i] = rule.apply(args[i], lambda t, dim: shard.split(t, dim=dim))
        if plan.adjust is not None:
            chunk = args[0].shape[1]
            plan.adjust(args, shard.index * chunk, (shard.index + 1) * chunk)
        shard.cache["reused"] = {i: args[i] for i in plan.reused if i < len(args)}
        return tuple(args)

    def reuse_inputs(module, args):
        args = list(args)
        for i, value in shard.cache["reused"].items():
            args[i] = value
        return tuple(args)

    def gather_output(module, args, output):
        shard.cache.clear()
        if plan.carried:
            return (shard.gather(output[0], dim=1), *output[1:])
        return shard.gather(output, dim=1)

    install_split_gather(handle, plan.block_list(transformer), split=split_inputs, reuse=reuse_inputs,
                         gather=gather_output, attention=plan.attention, processor=plan.exact(shard))
    setattr(transformer, _MARK, True)
    handle.undo.insert(0, lambda: setattr(transformer, _MARK, False))
    return handle
