"""What displaced patches (parallel/patch.py) and PipeFusion (parallel/pipefusion.py) share: K/V
from other patches that are one step stale, kept per (guidance branch, layer), after an exact
warm-up of `warmup_steps` steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from unison.parallel.comm import CommStats


@dataclass(kw_only=True)
class StaleKV:
    """This rank's place in its patch group, the step and branch under way, and the stale K/V
    buffers keyed by (branch, layer)."""

    group: object
    size: int
    index: int
    warmup_steps: int
    """The first steps exchange or recompute K/V synchronously: exact."""
    stats: CommStats | None = None
    step: int = 0
    branch: str = "cond"
    buffers: dict = field(default_factory=dict)

    def begin_step(self, index: int) -> None:
        self.step = index

    @property
    def synchronous(self) -> bool:
        return self.step < self.warmup_steps

    def reset(self) -> None:
        """A new video: no K/V of the last one is reused."""
        self.buffers.clear()

    def held_bytes(self) -> int:
        """Bytes of K/V buffers this rank holds."""
        raise NotImplementedError

    def _count(self, kind: str, t, copies: int = 1) -> None:
        if self.stats is not None:
            self.stats.add(kind, t.numel() * t.element_size() * copies)
