"""Apply parallelism to a loaded pipeline, in a fixed order.

1. sequence parallelism (Ulysses / Ring / USP) on every expert transformer;
2. CFG parallelism is not a transformation of the model: the loop runs one branch per half of
   the cfg axis and exchanges the predictions once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from unison.engine.build import parallel_dims
from unison.engine.models import ModelSpec
from unison.errors import UserError
from unison.parallel.attention import AttentionGroups
from unison.parallel.comm import CommStats
from unison.parallel.dims import Groups, ParallelDims, build_groups
from unison.parallel.sequence import Handle, SequenceShard, apply_sequence_parallel

log = logging.getLogger("unison")


@dataclass
class Runtime:
    """This rank's parallel state for one engine."""

    dims: ParallelDims
    groups: Groups
    stats: CommStats = field(default_factory=CommStats)
    shards: dict[str, SequenceShard] = field(default_factory=dict)
    """Each expert transformer's sequence shard (empty without sequence parallelism)."""

    @property
    def rank(self) -> int:
        return self.groups.rank

    @classmethod
    def create(cls, parallel, *, world_size: int) -> "Runtime":
        dims = parallel_dims(parallel, world_size=world_size)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(dims=dims, groups=build_groups(dims, rank=rank, timeout_s=parallel.timeout_s))


def parallelize(pipe, spec: ModelSpec, runtime: Runtime) -> list[Handle]:
    dims, groups = runtime.dims, runtime.groups
    if dims.patch > 1:
        raise UserError("patch parallelism is not in this build yet (parallel.patch must be 1)")
    handles = []
    if dims.sp > 1:
        attention = AttentionGroups(ulysses=groups.get("ulysses"), ulysses_size=dims.ulysses,
                                    ring=groups.get("ring"), ring_size=dims.ring,
                                    ring_index=groups.index("ring"), ulysses_index=groups.index("ulysses"),
                                    stats=runtime.stats)
        for name in spec.experts:
            transformer = getattr(pipe, name)
            shard = SequenceShard(attention=attention, group=groups.get("sp"), size=dims.sp,
                                  index=groups.index("sp"), stats=runtime.stats)
            handles.append(apply_sequence_parallel(transformer, spec.sequence_parallel_plan, shard))
            runtime.shards[name] = shard
    if runtime.rank == 0:
        log.info("%s on %d ranks", " x ".join(f"{a} {getattr(dims, a)}" for a in ("ulysses", "ring", "cfg")
                                             if getattr(dims, a) > 1) or "one rank", dims.world_size)
    return handles
