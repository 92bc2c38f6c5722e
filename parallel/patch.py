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

from unison.parallel.attention import AttentionGroups, check_heads, gather_heads, own_heads, scatter_heads, sdpa
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
                        valid_len: int, groups: AttentionGroups) -> torch.Tensor:
    """This rank's queries against every patch's keys (fresh here, stale elsewhere after warm-up);
    (batch, tokens, heads, head_dim) as the processors hold them; padded keys are sliced off.
    With Ulysses inside the patch (`groups`), the patch's ranks first trade heads for tokens, so
    each holds its heads of the whole patch and exchanges them with the same heads of the other
    patches; the output trades back."""
    u = groups.ulysses_size
    if u > 1:
        check_heads(q.shape[2], u)
        q, k, v = (scatter_heads(t, groups) for t in (q, k, v))
    k_all, v_all = kv.exchange(key, [k, v])
    out = sdpa(q, k_all[:, :valid_len], v_all[:, :valid_len])
    return gather_heads(out, groups) if u > 1 else out


def joint_over(q, k, v, text_q, text_k, text_v, *, text_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of video queries `q` and text queries against the whole video K/V (k, v:
    already trimmed to the real tokens) and the first `text_valid` text keys; returns (video
    output, text output), the video output with as many rows as q."""
    keys = torch.cat([k, text_k[:, :text_valid]], dim=1)
    values = torch.cat([v, text_v[:, :text_valid]], dim=1)
    both = sdpa(torch.cat([q, text_q], dim=1), keys, values)
    return both[:, :q.shape[1]], both[:, q.shape[1]:]


def displaced_joint_attention(q, k, v, text_q, text_k, text_v, *, kv: DisplacedKV, key, valid_len: int,
                              text_valid: int, groups: AttentionGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanVideo's joint attention under displaced patches: this rank's video queries and its
    copy of the text queries against every patch's video K/V (stale elsewhere after warm-up) and
    this rank's text K/V. In a synchronous step every rank sees the same K/V, so the text copies
    stay identical (exact); afterwards each rank's text sees its own patch fresh, and the copies
    differ by as much as the stale K/V do (each copy only feeds its own rank's patch). With
    Ulysses inside the patch, each rank attends with its heads of the text, and the patch's
    ranks gather the text output over heads, so they share one copy."""
    u = groups.ulysses_size
    if u > 1:
        check_heads(q.shape[2], u)
        q, k, v = (scatter_heads(t, groups) for t in (q, k, v))
        text_q, text_k, text_v = (own_heads(t, groups) for t in (text_q, text_k, text_v))
    k_all, v_all = kv.exchange(key, [k, v])
    out, text_out = joint_over(q, k_all[:, :valid_len], v_all[:, :valid_len], text_q, text_k, text_v,
                               text_valid=text_valid)
    if u > 1:
        out = gather_heads(out, groups)
        text_out = all_gather(text_out, dim=2, group=groups.ulysses, stats=groups.stats)
    return out, text_out
