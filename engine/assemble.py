"""The one place a loaded pipeline becomes what the loop runs, in a fixed order:

1. weight sharding (parallel.shard_weights): every expert's blocks over all the engine's ranks
   with FSDP2 (parallel/shard.py). First, so that on each block FSDP2's forward hook (free the
   gathered weights) runs before the sequence gather hook on the last block (which allocates the
   whole sequence); its pre-forward hook is prepended, so the weights are gathered before the
   split hooks and the attention processors run, whatever the order. It only swaps parameters,
   which sequence parallelism never touches. One group of every rank, both CFG halves too: the
   weights are the same on all of them.
2. the token split, one of: PipeFusion (the blocks split into stages; parallel/pipefusion.py), or
   one sequence split over the patch x ring x ulysses ranks (in that order, so that a patch is a
   contiguous range), with exact attention (Ulysses / Ring / USP) or displaced patches
   (self-attention over stale K/V from the other patches, Ulysses inside each patch;
   parallel/patch.py). The family's split plan says where (engine/models/<family>/parallel.py).
3. compile (model.compile=blocks): after the split, so that what is compiled is the blocks and
   the processors it leaves (engine/compile.py says why that composes).
4. the step caches, per render (a render may name other caches): after compile, because a
   cache wraps a block's or an attention's `forward` on the instance and its wrapper looks the
   class's (compiled) `forward` up when called; every hook installed above runs around them.
5. parallel VAE decode (output.parallel_decode): the VAE the family's decode step receives, a
   stand-in that spreads the VAE's own tiles over every rank of the engine.

CFG parallelism is no transformation of the model: the loop runs one branch per half of the cfg
axis (parallel/cfg.py). `assemble` returns an `Assembly`: what the loop and the render need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from unison.caching import Cache
from unison.caching.base import CacheConfig
from unison.engine.caches import apply_caches
from unison.engine.config import OutputConfig, ParallelConfig
from unison.engine.models import ModelSpec
from unison.parallel.attention import AttentionGroups
from unison.parallel.cfg import Guidance
from unison.parallel.comm import CommStats
from unison.parallel.dims import Groups, ParallelDims, build_groups
from unison.parallel.patch import DisplacedKV
from unison.parallel.pipefusion import PipeStage, StageRunner, apply_pipefusion
from unison.parallel.sequence import SequenceShard, apply_sequence_parallel
from unison.parallel.shard import ShardedWeights, apply_weight_sharding
from unison.parallel.stale import StaleKV

log = logging.getLogger("unison")


@dataclass
class Runtime:
    """This rank's parallel state for one engine. Told of a new video, the step and the branch as
    a cache is (`reset`, `begin_step`, `set_context`): stale K/V are kept per branch."""

    dims: ParallelDims
    groups: Groups
    stats: CommStats = field(default_factory=CommStats)
    shards: dict[str, SequenceShard] = field(default_factory=dict)
    """Each expert transformer's sequence shard (empty without sequence or displaced patch parallelism)."""
    stale: dict[str, StaleKV] = field(default_factory=dict)
    """Patch parallelism's per-expert state (stale K/V, steps, branch)."""
    runners: dict[str, StageRunner] = field(default_factory=dict)
    """PipeFusion: each expert's StageRunner (where First-Block Cache gates the pipeline)."""
    sharded: dict[str, ShardedWeights] = field(default_factory=dict)
    """parallel.shard_weights: each expert's sharded blocks (empty otherwise)."""

    def reset(self) -> None:
        """A new video."""
        for state in self.stale.values():
            state.reset()

    def begin_step(self, index: int, timestep: float | None = None) -> None:
        for state in self.stale.values():
            state.begin_step(index)

    def set_context(self, branch: str) -> None:
        """The guidance branch about to run."""
        for state in self.stale.values():
            state.branch = branch

    def describe(self, transformers: dict) -> list[str]:
        """Per-rank memory of weight sharding (block weights held) and of patch parallelism
        (weights held and stale K/V buffers)."""
        lines = [f"{name}: {sharded.describe()}" for name, sharded in self.sharded.items()]
        for name, state in self.stale.items():
            weights = sum(p.numel() * p.element_size() for p in transformers[name].parameters())
            mode = "PipeFusion stage" if isinstance(state, PipeStage) else "displaced patches"
            lines.append(f"{name}: {mode}, weights {weights / 2**20:.2f} MiB per rank, stale K/V buffers "
                         f"{state.held_bytes() / 2**20:.2f} MiB per rank (warm-up {state.warmup_steps} steps)")
        return lines

    @property
    def rank(self) -> int:
        return self.groups.rank

    @classmethod
    def create(cls, parallel: ParallelConfig, *, world_size: int) -> "Runtime":
        from unison.engine.plan import parallel_dims

        dims = parallel_dims(parallel, world_size=world_size)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(dims=dims, groups=build_groups(dims, rank=rank, timeout_s=parallel.timeout_s))


@dataclass
class Assembly:
    """What `assemble` made of a pipeline: the parallel runtime, the compiled blocks, the caches
    applied for the current render, and the guidance exchange."""

    pipe: object
    spec: ModelSpec
    runtime: Runtime | None
    guidance: Guidance
    compiled: dict = field(default_factory=dict)
    caches: dict[str, Cache] = field(default_factory=dict)
    cache_config: tuple | None = None

    def use_caches(self, cache: CacheConfig, cache_2: CacheConfig | None = None) -> None:
        """Step 4 for a render: its cache configs (`cache_2`: Wan 2.2's low-noise expert's),
        replacing different ones from an earlier render."""
        if (cache, cache_2) == self.cache_config:
            return
        for applied in self.caches.values():
            applied.remove()
        self.caches = apply_caches(self.pipe, self.spec, cache, self.runtime, cache_2=cache_2)
        self.cache_config = (cache, cache_2)

    def vae(self, output: OutputConfig):
        """Step 5: the VAE the family's decode receives: with more than one rank and
        output.parallel_decode a stand-in whose decode is collective (every rank decodes its share
        of the VAE's tiles, rank 0 gets the video, the others None), else the pipeline's own
        (tiled with output.vae_tiling)."""
        if self.runtime is not None and output.parallel_decode:
            from unison.parallel.vae import ParallelVAE

            # The whole engine's group: every rank takes part, whatever the denoising layout. No
            # byte counts: the runtime's counters are reported per denoising step.
            return ParallelVAE(self.pipe.vae, tiling=self.spec.vae_tiling, group=self.runtime.groups.get("cfg_tokens"))
        if output.vae_tiling:
            self.pipe.vae.enable_tiling()
        return self.pipe.vae


def assemble(pipe, spec: ModelSpec, *, parallel: ParallelConfig, world_size: int, compile_blocks: bool,
             announce: bool) -> Assembly:
    """Steps 1 to 3 on a loaded pipeline, in order (the caches come with each render,
    `Assembly.use_caches`; the VAE with each decode, `Assembly.vae`). `announce`: log what was
    applied (rank 0)."""
    runtime = None
    if world_size > 1:
        runtime = Runtime.create(parallel, world_size=world_size)
        if parallel.shard_weights:  # 1
            for name in spec.experts:
                runtime.sharded[name] = apply_weight_sharding(
                    getattr(pipe, name), block_lists=spec.block_lists,
                    mesh_or_group=runtime.groups.get("cfg_tokens"), stats=runtime.stats)
        _split_tokens(pipe, spec, runtime, parallel)  # 2
        if announce:
            dims = runtime.dims
            log.info("%s on %d ranks", " x ".join(f"{a} {getattr(dims, a)}" for a in ("ulysses", "ring", "patch", "cfg")
                                                 if getattr(dims, a) > 1) or "one rank", dims.world_size)
            for name, sharded in runtime.sharded.items():
                log.info("%s: %s", name, sharded.describe())
    compiled = {}
    if compile_blocks:  # 3
        from unison.engine.compile import compile_experts

        compiled = compile_experts(pipe, spec, announce=announce)
    guidance = Guidance(group=runtime.groups.get("cfg") if runtime is not None else None,
                        index=runtime.groups.index("cfg") if runtime is not None else 0,
                        stats=runtime.stats if runtime is not None else None)
    return Assembly(pipe=pipe, spec=spec, runtime=runtime, guidance=guidance, compiled=compiled)


def _split_tokens(pipe, spec: ModelSpec, runtime: Runtime, parallel: ParallelConfig) -> None:
    """Step 2 on every expert (plan_run has checked that the family supports the mode)."""
    dims, groups = runtime.dims, runtime.groups
    if dims.patch > 1 and parallel.patch_mode == "pipefusion":
        for name in spec.experts:
            stage = PipeStage(group=groups.get("patch"), size=dims.patch, index=groups.index("patch"),
                              warmup_steps=parallel.patch_warmup_steps,
                              patches=parallel.pipefusion_patches or dims.patch,
                              stats=runtime.stats, backend=parallel.attention_backend)
            runtime.runners[name] = apply_pipefusion(getattr(pipe, name), spec.token_plan, stage)
            runtime.stale[name] = stage
    elif dims.patch > 1 or dims.sp > 1:
        # Displaced patches exchange stale K/V over the patch group, after Ulysses has traded
        # heads for tokens inside the patch.
        attention = AttentionGroups(ulysses=groups.get("ulysses"), ulysses_size=dims.ulysses,
                                    ring=groups.get("ring"), ring_size=dims.ring,
                                    ring_index=groups.index("ring"), ulysses_index=groups.index("ulysses"),
                                    stats=runtime.stats, backend=parallel.attention_backend)
        for name in spec.experts:
            shard = SequenceShard(attention=attention, group=groups.get("tokens"), size=groups.size("tokens"),
                                  index=groups.index("tokens"), stats=runtime.stats)
            if dims.patch > 1:
                shard.displaced = DisplacedKV(group=groups.get("patch"), size=dims.patch,
                                              index=groups.index("patch"), warmup_steps=parallel.patch_warmup_steps,
                                              stats=runtime.stats)
                runtime.stale[name] = shard.displaced
            apply_sequence_parallel(getattr(pipe, name), spec.token_plan, shard)
            runtime.shards[name] = shard
