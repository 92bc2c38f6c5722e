"""Classifier-free guidance, and CFG parallelism: the two guidance branches on the two halves of
the cfg axis.

Not a transformation of the model: with a cfg group each half computes one branch (cfg index 0
the conditional, 1 the unconditional) and the two predictions are exchanged once per step by one
all-gather; every rank then combines them identically, so both halves step the scheduler with
the same noise. Without one, one rank computes both branches in turn. Either way the combination
is the same arithmetic, uncond + scale * (cond - uncond), so CFG parallel changes nothing but
speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from unison.parallel.comm import CommStats, all_gather


@dataclass(frozen=True)
class Guidance:
    """This rank's part in guidance: the cfg group (None: both branches here) and its index in it."""

    group: object | None = None
    index: int = 0
    stats: CommStats | None = None

    @property
    def parallel(self) -> bool:
        return self.group is not None

    def check(self, *, two_branches: bool) -> None:
        """Before the first step: CFG parallelism needs two branches to split."""
        if self.group is not None and not two_branches:
            raise ValueError("CFG parallel needs two guidance branches, but this run has one")

    def noise(self, predict: Callable[[str], torch.Tensor], *, two_branches: bool, scale: float) -> torch.Tensor:
        """The guided noise prediction. `predict(branch)` runs the model on "cond" or "uncond";
        with one branch (embedded guidance, or guidance off) the conditional prediction is the noise."""
        if self.group is not None:
            mine = predict("cond" if self.index == 0 else "uncond")
            both = all_gather(mine.unsqueeze(0), dim=0, group=self.group, stats=self.stats)
            return both[1] + scale * (both[0] - both[1])
        noise = predict("cond")
        if two_branches:
            uncond = predict("uncond")
            noise = uncond + scale * (noise - uncond)
        return noise
