"""The agreement primitive: how a data-dependent skip decision becomes the same on every rank.

A cache that decides from tensor data (First-Block Cache's residual change) must not decide from
this rank's shard alone: ranks would disagree, and the ones that compute would wait forever in a
collective the others skipped. `Agreement.ratio` turns per-rank partial sums into one number,
Σ numerator / Σ denominator over exactly the ranks that share the skipped region's collectives
(one float64 all-reduce carrying both), before any rank takes a branch. Every rank gets the same
float, and it equals what one rank computes over the whole sequence (sums, not a mean of means).

Verify mode then cross-checks the decision itself: a rank that decided differently (a bug, or a
metric perturbed on purpose in tests) raises an error naming the step, the cache and the ranks,
on every rank, before anyone enters a collective the others skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from unison.parallel.comm import CommStats, all_gather, all_reduce_sum


class CacheDisagreement(RuntimeError):
    """Ranks took different cache decisions (raised on every rank of the group, in verify mode)."""


@dataclass
class Agreement:
    group: object | None = None
    """The ranks that share the skipped region's collectives (None: this rank alone)."""
    stats: CommStats | None = None
    verify: bool = False
    """Cross-check every decision across the group."""

    def ratio(self, numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        """Σ numerator / Σ denominator over the group (inf when the denominator is zero)."""
        sums = torch.stack([numerator.to(torch.float64), denominator.to(torch.float64)])
        num, den = all_reduce_sum(sums, group=self.group, stats=self.stats).tolist()
        return num / den if den else float("inf")

    def check(self, compute: bool, *, step: int, cache: str, context: str) -> None:
        """In verify mode: raise CacheDisagreement on every rank unless all decided `compute`."""
        if not self.verify or self.group is None:
            return
        mine = torch.tensor([int(compute)], dtype=torch.int32, device=self._device())
        every = all_gather(mine, dim=0, group=self.group, stats=self.stats).tolist()
        if len(set(every)) > 1:
            ranks = dist.get_process_group_ranks(self.group)
            said = ", ".join(f"rank {r} {'computes' if c else 'skips'}" for r, c in zip(ranks, every))
            raise CacheDisagreement(f"step {step}: {cache} ({context}) decisions disagree: {said}")

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
