"""Displaced patch parallelism (DistriFusion's idea, for video DiTs): each rank computes its own
patch of tokens through every block, and its self-attention uses its fresh K/V for its own patch
and the other ranks' K/V from the previous step.

The patch is a contiguous range of the token sequence, which is frame-major (frame, row,
column): a range of frames, and of rows inside a frame where the split is uneven. That reuses
sequence parallelism's split and gather (and its RoPE slicing) unchanged, and a DiT has no
convolution across patch borders (the reason DistriFusion splits U-Net images by rows), so the
only interaction between patches is attention, which is exactly what the stale K/V stand in for.

Per self-attention layer and guidance branch, a rank keeps the full K and V from the previous
step. In a displaced step it overwrites its own chunk with the fresh K/V, attends, and starts an
asynchronous all-gather of its fresh K/V that is waited on only when the same layer runs in the
next step, so the exchange overlaps a whole step of compute. The first `warmup_steps` steps
gather synchronously and attend to fresh K/V everywhere: they equal the one-rank result. When a
cache skips a layer, nothing is exchanged; the next computed step sees the K/V of the last step
that computed it (its pending all-gather is waited on then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from unison.parallel.attention import sdpa
from unison.parallel.comm import CommStats, all_gather


@dataclass
class _Buffer:
    parts: list[list[torch.Tensor]]
    """Per gathered tensor (K, V, ...), every rank's chunk in group-rank order."""
    work: object | None = None
    """The pending asynchronous all-gather filling `parts` (None once complete)."""

    def full(self, dim: int) -> list[torch.Tensor]:
        if self.work is not None:
            for w in self.work:
                w.wait()
            self.work = None
        return [torch.cat(p, dim=dim) for p in self.parts]


@dataclass
class DisplacedKV:
    """Stale K/V per (branch, layer) for one transformer on one patch group."""

    group: object
    size: int
    index: int
    warmup_steps: int
    stats: CommStats | None = None
    step: int = 0
    branch: str = "cond"
    buffers: dict = field(default_factory=dict)
    bytes_held: int = 0

    def begin_step(self, index: int) -> None:
        self.step = index

    def reset(self) -> None:
        """A new video: finish pending transfers (every rank issued them) and forget every buffer."""
        for buffer in self.buffers.values():
            buffer.full(dim=1)
        self.buffers.clear()

    @property
    def synchronous(self) -> bool:
        return self.step < self.warmup_steps

    def exchange(self, key, fresh: list[torch.Tensor], *, dim: int = 1) -> list[torch.Tensor]:
        """Full-sequence tensors for this layer: every rank's fresh chunks in a synchronous step
        (or the first time a layer runs), else the stale ones with this rank's chunk fresh; then
        start sharing this step's fresh chunks for the next step."""
        key = (self.branch, key)
        previous = self.buffers.get(key)
        if self.synchronous or previous is None:
            full = [all_gather(t, dim=dim, group=self.group, stats=self.stats) for t in fresh]
            self.buffers[key] = _Buffer(parts=[list(t.chunk(self.size, dim=dim)) for t in full])
            return full
        stale = previous.full(dim)
        chunk = fresh[0].shape[dim]
        for t, f in zip(stale, fresh):
            t.narrow(dim, self.index * chunk, chunk).copy_(f)
        self.buffers[key] = self._start(fresh)
        return stale

    def _start(self, fresh: list[torch.Tensor]) -> _Buffer:
        parts, work = [], []
        for t in fresh:
            t = t.contiguous()
            slots = [torch.empty_like(t) for _ in range(self.size)]
            work.append(dist.all_gather(slots, t, group=self.group, async_op=True))
            parts.append(slots)
            if self.stats is not None:
                self.stats.add("all_gather_async", t.numel() * t.element_size() * (self.size - 1))
        return _Buffer(parts=parts, work=work)

    def held_bytes(self) -> int:
        """Bytes of K/V buffers this rank holds (full-sequence K and V per layer and branch)."""
        return sum(p.numel() * p.element_size() for b in self.buffers.values() for ps in b.parts for p in ps)


def displaced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv: DisplacedKV, key,
                        valid_len: int) -> torch.Tensor:
    """This rank's queries against every patch's keys (fresh here, stale elsewhere after warm-up);
    (batch, tokens, heads, head_dim) as the processors hold them; padded keys are sliced off."""
    k_all, v_all = kv.exchange(key, [k, v])
    return sdpa(q, k_all[:, :valid_len], v_all[:, :valid_len])
