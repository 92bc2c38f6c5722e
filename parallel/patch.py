"""Displaced patch parallelism (DistriFusion's idea, for video DiTs): each rank computes its own
patch of tokens through every block, and its self-attention uses its fresh K/V for its own patch
and the other ranks' K/V from the previous step.

The patch is a contiguous range of the token sequence, which is frame-major (frame, row,
column): a range of frames, and of rows inside a frame where the split is uneven. That reuses
sequence parallelism's split and gather (and its RoPE slicing) unchanged, and a DiT has no
convolution across patch borders (the reason DistriFusion splits U-Net images by rows), so the
only interaction between patches is attention, which is exactly what the stale K/V stand in for.

Per self-attention layer and guidance branch, a rank keeps one whole-sequence K and one V buffer,
allocated the first time the layer runs and refilled in place from then on. In a displaced step it
waits for the all-gather that the same layer started in the previous step, overwrites its own
chunk with the fresh K/V, attends, and only then starts an asynchronous all-gather of that chunk
into the same buffers (the other ranks' chunks are what this step's attention just read), waited
on when the layer next runs: the exchange overlaps a whole step of compute, and no step copies
or allocates a whole sequence. The first `warmup_steps` steps gather synchronously and attend to
fresh K/V everywhere: they equal the one-rank result. When a cache skips a layer, nothing is
exchanged; the next computed step sees the K/V of the last step that computed it (its pending
all-gather is waited on then).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from unison.parallel.attention import KVSource
from unison.parallel.stale import StaleKV

# all_gather_single is all_gather_into_tensor's name from torch 2.13 (the old one warns there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

T = TypeVar("T")


@dataclass
class _Buffer:
    """One layer's whole-sequence K and V of one guidance branch, each (batch, group size, chunk,
    heads, head_dim): group rank r's chunk of sample b at [b, r], so an all-gather of a sample
    writes every rank's chunk straight into place, and `flatten(1, 2)` is the (batch, tokens,
    heads, head_dim) sequence without a copy."""

    tensors: list[torch.Tensor]
    work: list = field(default_factory=list)
    """The pending asynchronous all-gathers filling `tensors` (empty once complete)."""

    def wait(self) -> None:
        for work in self.work:
            work.wait()
        self.work.clear()

    def sequences(self) -> list[torch.Tensor]:
        return [t.flatten(1, 2) for t in self.tensors]


@dataclass(kw_only=True)
class DisplacedKV(StaleKV):
    """Stale K/V per (branch, layer) for one transformer on one patch group, exchanged by an
    asynchronous all-gather a step ahead."""

    def reset(self) -> None:
        """A new video: finish pending transfers (every rank issued them) and free every buffer."""
        for buffer in self.buffers.values():
            buffer.wait()
        super().reset()

    def exchange(self, key, k: torch.Tensor, v: torch.Tensor, attend: Callable[[torch.Tensor, torch.Tensor], T]) -> T:
        """`attend(keys, values)` over the whole sequence, (batch, tokens, heads, head_dim) with
        this rank's fresh chunk `k`, `v` in place: every rank's fresh chunks in a synchronous step
        (or the first time a layer runs), else the other ranks' from the layer's previous step.
        Then this step's fresh chunks are shared for the next step. Returns what `attend` does."""
        key = (self.branch, key)
        buffer = self.buffers.get(key)
        if buffer is not None:
            buffer.wait()  # the chunks the previous step's all-gather is writing
        shapes = [(t.shape[0], self.size, *t.shape[1:]) for t in (k, v)]
        new = buffer is None or [t.shape for t in buffer.tensors] != shapes or buffer.tensors[0].dtype != k.dtype
        if new:
            buffer = self.buffers[key] = _Buffer(tensors=[t.new_empty(s) for t, s in zip((k, v), shapes)])
        for t, chunk in zip(buffer.tensors, (k, v)):
            t[:, self.index].copy_(chunk)
        if self.synchronous or new:
            self._gather(buffer, asynchronous=False)
            return attend(*buffer.sequences())
        out = attend(*buffer.sequences())
        # Only after the attention has read the buffers may the all-gather overwrite them. (On a
        # GPU the collective's stream first waits for the work queued so far, attention included.)
        self._gather(buffer, asynchronous=True)
        return out

    def _gather(self, buffer: _Buffer, *, asynchronous: bool) -> None:
        """Every rank's chunk into `buffer`, in place: the input is this rank's own slot. One
        collective per tensor and sample (the engine runs one sample per forward)."""
        kind = "all_gather_async" if asynchronous else "all_gather"
        for t in buffer.tensors:
            for sample in t:  # (size, chunk, ...): group rank r's chunk at r
                work = _all_gather_single(sample.flatten(0, 1), sample[self.index], group=self.group,
                                          async_op=asynchronous)
                if asynchronous:
                    buffer.work.append(work)
            if self.stats is not None:
                self.stats.add(kind, t[:, self.index].numel() * t.element_size() * (self.size - 1))

    def source(self, key) -> KVSource:
        """The layer's whole-sequence K/V for `sequence_attention` (its `kv` argument).

        With HunyuanVideo's joint attention, each rank's copy of the text attends to the same
        K/V as its patch: in a synchronous step every rank sees the same K/V, so the copies stay
        identical (exact); afterwards each copy sees its own patch fresh and differs by as much
        as the stale K/V do (each copy only feeds its own rank's patch). With Ulysses inside the
        patch, sequence_attention gathers the text output over heads, so the patch's ranks share
        one copy."""
        return functools.partial(self.exchange, key)

    def held_bytes(self) -> int:
        """Bytes of K/V buffers this rank holds (whole-sequence K and V per layer and branch,
        padding included)."""
        return sum(t.numel() * t.element_size() for b in self.buffers.values() for t in b.tensors)
