"""Apply parallelism to a loaded pipeline, in a fixed order.

1. with parallel.shard_weights, on every expert transformer: its blocks' weights sharded over
   all the engine's ranks with FSDP2, gathered block by block in the forward (parallel/shard.py);
2. on every expert transformer: PipeFusion (the blocks split into stages; parallel/pipefusion.py),
   or one sequence split over the patch x ring x ulysses ranks: exact attention (Ulysses / Ring /
   USP), or displaced patches (self-attention over stale K/V from the other patches, Ulysses
   inside each patch; parallel/patch.py);
3. CFG parallelism is not a transformation of the model: the loop runs one branch per half of
   the cfg axis and exchanges the predictions once per step.

Step caches come later, per render (engine/caches.py): they replace block and attention
`forward`s, which every hook installed here runs around.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from unison.engine.build import parallel_dims
from unison.engine.config import ParallelConfig
from unison.engine.models import ModelSpec
from unison.parallel.attention import AttentionGroups
from unison.parallel.comm import CommStats
from unison.parallel.dims import Groups, ParallelDims, build_groups
from unison.parallel.patch import DisplacedKV
from unison.parallel.pipefusion import PipeStage, StageRunner
from unison.parallel.shard import ShardedWeights, apply_weight_sharding
from unison.parallel.sequence import Handle, SequenceShard, apply_sequence_parallel

log = logging.getLogger("unison")


@dataclass
class Runtime:
    """This rank's parallel state for one engine."""

    dims: ParallelDims
    groups: Groups
    stats: CommStats = field(default_factory=CommStats)
    shards: dict[str, SequenceShard] = field(default_factory=dict)
    """Each expert transformer's sequence shard (empty without sequence or displaced patch parallelism)."""
    stale: dict[str, DisplacedKV | PipeStage] = field(default_factory=dict)
    """Patch parallelism's per-expert state (stale K/V, steps, branch)."""
    runners: dict[str, StageRunner] = field(default_factory=dict)
    """PipeFusion: each expert's StageRunner (where First-Block Cache gates the pipeline)."""
    sharded: dict[str, ShardedWeights] = field(default_factory=dict)
    """parallel.shard_weights: each expert's sharded blocks (empty otherwise)."""

    def begin_video(self) -> None:
        for state in self.stale.values():
            state.reset()

    def begin_step(self, index: int) -> None:
        for state in self.stale.values():
            state.begin_step(index)

    def set_branch(self, branch: str) -> None:
        """The guidance branch about to run: stale K/V are kept per branch."""
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
    def create(cls, parallel, *, world_size: int, device_type: str = "cpu") -> "Runtime":
        dims = parallel_dims(parallel, world_size=world_size)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(dims=dims, groups=build_groups(dims, rank=rank, timeout_s=parallel.timeout_s,
                                                  device_type=device_type))


def parallelize(pipe, spec: ModelSpec, runtime: Runtime, parallel: ParallelConfig) -> list[Handle]:
    """Shard the block weights (parallel.shard_weights), then apply sequence or patch parallelism
    (displaced or PipeFusion), to every expert."""
    dims, groups = runtime.dims, runtime.groups
    warmup_steps = parallel.patch_warmup_steps
    handles = []
    if parallel.shard_weights:
        # First, so that on each block FSDP2's forward hook (free the gathered weights) runs before
        # the sequence gather hook on the last block (which allocates the whole sequence); its
        # pre-forward hook is prepended, so the weights are gathered before the split hooks and
        # the attention processors run whatever the order. It only swaps parameters, which
        # sequence parallelism never touches. plan_run refuses it with patch parallelism. One
        # group of every rank (both CFG halves too): the weights are the same on all of them.
        for name in spec.experts:
            runtime.sharded[name] = apply_weight_sharding(getattr(pipe, name), block_lists=spec.block_lists,
                                                          mesh_or_group=groups.get("cfg_tokens"), stats=runtime.stats)
    # plan_run has checked that the family supports the patch mode.
    if dims.patch > 1 and parallel.patch_mode == "pipefusion":
        for name in spec.experts:
            stage = PipeStage(group=groups.get("patch"), size=dims.patch, index=groups.index("patch"),
                              warmup_steps=warmup_steps, patches=parallel.pipefusion_patches or dims.patch,
                              stats=runtime.stats, backend=parallel.attention_backend)
            runtime.runners[name] = spec.pipefusion_plan(getattr(pipe, name), stage)
            runtime.stale[name] = stage
    elif dims.patch > 1 or dims.sp > 1:
        # One split over every rank of the branch's tokens (patch x ring x ulysses, in that order,
        # so a patch is a contiguous range); displaced patches exchange stale K/V over the patch
        # group, after Ulysses has traded heads for tokens inside the patch.
        attention = AttentionGroups(ulysses=groups.get("ulysses"), ulysses_size=dims.ulysses,
                                    ring=groups.get("ring"), ring_size=dims.ring,
                                    ring_index=groups.index("ring"), ulysses_index=groups.index("ulysses"),
                                    stats=runtime.stats, backend=parallel.attention_backend)
        for name in spec.experts:
            shard = SequenceShard(attention=attention, group=groups.get("tokens"), size=groups.size("tokens"),
                                  index=groups.index("tokens"), stats=runtime.stats)
            if dims.patch > 1:
                shard.displaced = DisplacedKV(group=groups.get("patch"), size=dims.patch,
                                              index=groups.index("patch"), warmup_steps=warmup_steps,
                                              stats=runtime.stats)
                runtime.stale[name] = shard.displaced
            handles.append(apply_sequence_parallel(getattr(pipe, name), spec.sequence_parallel_plan, shard))
            runtime.shards[name] = shard
    if runtime.rank == 0:
        log.info("%s on %d ranks", " x ".join(f"{a} {getattr(dims, a)}" for a in ("ulysses", "ring", "patch", "cfg")
                                             if getattr(dims, a) > 1) or "one rank", dims.world_size)
        for name, sharded in runtime.sharded.items():
            log.info("%s: %s", name, sharded.describe())
    return handles
