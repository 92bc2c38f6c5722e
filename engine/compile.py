"""model.compile=blocks: regional compilation, each kind of transformer block compiled once.

What is compiled is a block's own `forward` (norms, modulation, projections, RoPE, the feed-
forward), nothing around it. The block's class is swapped for a subclass whose `forward` is one
`torch.compile`d function per block class, so all the blocks of a class share one compiled code
(TorchDynamo guards on parameter shapes, not on which module they belong to): compile time is one
block's, not the model's (diffusers' `compile_repeated_blocks` makes the same trade).

What stays eager, and why it composes in any order:
- hooks run in the module's `__call__`, around `forward`: sequence parallelism's split and
  gather, FSDP2's weight gathering;
- a step cache replaces a block's or an attention's `forward` on the instance
  (caching/base.py). An instance attribute wins over the class, so First-Block Cache's decision
  runs eagerly around the compiled forward, and its wrappers look the class's `forward` up when
  called, so a cache applied before compiling runs the compiled code too. A cache wrapper is
  `torch.compiler.disable`d: Pyramid Attention Broadcast's, met inside a compiled block, is a graph
  break, and the attention it wraps runs eagerly;
- the collectives of the parallel attention processors: each processor projects and rotates
  q, k, v (compiled) and hands them to one `torch.compiler.disable`d step that reads the
  per-forward state (valid length, text length, stale K/V keyed by layer, pipeline stage) and
  communicates (`_attend_across` / `_attend_stage` in engine/models/<family>/parallel.py). Gloo's
  in-place collectives, asynchronous handles and ring P2P are not traceable (on NCCL, traced
  functional collectives would work but would not cover those), and per-forward state read in
  traced code would be guarded on: a recompilation per value, and per layer for `id(attn)`.
  parallel/comm.py's helpers are not disabled themselves: everything that calls them inside a
  block is, and marking them would import TorchDynamo into every process that communicates.
So under sequence or patch parallelism a block is a few graphs with eager attention between them
(Wan: 4 per block class); on one rank (diffusers' own processors) it is one graph.

`dynamic=False`: every shape a block sees is fixed by the video's size (and PipeFusion's patch
lengths), so shapes are specialised; a new video size compiles again.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from unison.engine.models import ModelSpec
from unison.parallel.pipefusion import StageRunner

log = logging.getLogger("unison")

_MARK = "_unison_compiled_blocks"


def transformer_blocks(transformer: torch.nn.Module, spec: ModelSpec) -> list[torch.nn.Module]:
    """The blocks of `spec.block_lists`, in execution order; under PipeFusion, this stage's blocks
    (the StageRunner that stands in for the lists passes patches between stages: never compiled)."""
    blocks = []
    for attr in spec.block_lists:
        for module in getattr(transformer, attr):
            blocks.extend(module.local if isinstance(module, StageRunner) else [module])
    return blocks


@dataclass
class CompiledBlocks:
    """What compile_blocks did to one transformer; `remove()` puts the eager classes back."""

    transformer: torch.nn.Module
    blocks: list[torch.nn.Module]
    options: dict
    eager: dict[int, type] = field(default_factory=dict)
    """id(block) -> its class before compiling."""

    def describe(self) -> str:
        kinds = Counter(cls.__name__ for cls in self.eager.values())
        listed = ", ".join(f"{n} x {name}" for name, n in kinds.items())
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{len(self.blocks)} blocks compiled ({listed}; one graph set per class; {opts})"

    def remove(self) -> None:
        for block in self.blocks:
            block.__class__ = self.eager[id(block)]
        self.blocks, self.eager = [], {}
        setattr(self.transformer, _MARK, None)


def compile_blocks(transformer: torch.nn.Module, spec: ModelSpec, *, backend: str = "inductor",
                   mode: str | None = None, dynamic: bool = False, fullgraph: bool = False) -> CompiledBlocks:
    """Compile the `forward` of every block of `transformer` (see the module docstring): one
    `torch.compile` per block class. Apply it after parallelism (PipeFusion keeps only this
    stage's blocks; the parallel processors are installed); caches may come before or after.
    Applying twice is an error; `CompiledBlocks.remove()` undoes it."""
    if getattr(transformer, _MARK, None) is not None:
        raise RuntimeError("the blocks of this transformer are already compiled")
    blocks = transformer_blocks(transformer, spec)
    if not blocks:
        raise ValueError(f"no blocks in {spec.block_lists}")
    options = {k: v for k, v in dict(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph).items()
               if v is not None}
    compiled = CompiledBlocks(transformer=transformer, blocks=blocks, options=options)
    for block in blocks:
        compiled.eager[id(block)] = type(block)
        block.__class__ = _compiled_class(type(block), tuple(sorted(options.items())))
    setattr(transformer, _MARK, compiled)
    return compiled


@functools.cache
def _compiled_class(cls: type, options: tuple) -> type:
    """The subclass of `cls` whose forward is compiled, one per class and options for the life of
    the process: TorchDynamo guards on the block's type, so every engine built here reuses the
    graphs (a second engine of the same shapes compiles nothing), and no engine's blocks use up
    another's share of the recompile limit."""
    graphs = torch.compile(cls.forward, **dict(options))

    def forward(self, *args, **kwargs):
        return graphs(self, *(_canonical_strides(a) for a in args),
                      **{k: _canonical_strides(v) for k, v in kwargs.items()})

    forward.__doc__ = cls.forward.__doc__
    return type(f"Compiled{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})


def _canonical_strides(x):
    """`x` with the strides a fresh tensor of its shape has: TorchDynamo guards on every stride,
    and an input laid out differently compiles the block a second time for nothing.

    A contiguous tensor can have any stride on a size-1 dimension (a batch-1 token sequence sliced
    out of a longer one: sequence parallelism's shard, a single-stream block's output without the
    text, keeps the longer one's): the view with canonical strides over the same memory addresses
    the same elements, no copy. A non-contiguous one (HunyuanVideo's patch embedding hands the
    first block a transposed sequence) is copied: once per forward, since a block given
    contiguous inputs returns a contiguous output."""
    if not isinstance(x, torch.Tensor):
        return x
    if not x.is_contiguous():
        return x.contiguous()
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    if tuple(strides) == x.stride():
        return x
    return x.as_strided(x.shape, strides, x.storage_offset())


def compile_experts(pipe, spec: ModelSpec, *, announce: bool) -> dict[str, CompiledBlocks]:
    """compile_blocks on every expert transformer of `pipe`; `announce`: log what was compiled
    (rank 0 passes True, once per engine)."""
    compiled = {name: compile_blocks(getattr(pipe, name), spec) for name in spec.experts}
    if announce:
        for name, done in compiled.items():
            log.info("compile %s: %s", name, done.describe())
    return compiled
