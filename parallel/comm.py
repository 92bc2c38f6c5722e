"""Collectives over explicit groups, each a no-op on a group of one, with byte counters.

Counters record bytes *sent* by this rank per collective kind, so a run can be compared with
the analytic minimum (e.g. Ulysses sends (U-1)/U of q, k, v and the output per attention).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    bytes_sent: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(x: torch.Tensor, *, group, stats: CommStats | None) -> torch.Tensor:
    """x: (n, ...) with chunk j going to group rank j; returns (n, ...) with chunk j from rank j."""
    if group is None:
        return x
    n = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    if stats is not None:
        stats.add("all_to_all", _nbytes(x) * (n - 1) // n)
    return out


def all_gather(x: torch.Tensor, *, dim: int, group, stats: CommStats | None) -> torch.Tensor:
    """Concatenate every group rank's `x` along `dim`, in group-rank order."""
    if group is None:
        return x
    n = dist.get_world_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    if stats is not None:
        stats.add("all_gather", _nbytes(x) * (n - 1))
    return torch.cat(parts, dim=dim)


def ring_exchange(tensors: list[torch.Tensor], *, group, stats: CommStats | None):
    """Start sending `tensors` to the next group rank and receiving the previous rank's.

    Returns (received tensors, wait function): call wait() before reading them, so the
    transfer overlaps whatever is computed in between.
    """
    n = dist.get_world_size(group)
    me = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % n)
    prv = dist.get_global_rank(group, (me - 1) % n)
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), nxt, group))
        ops.append(dist.P2POp(dist.irecv, r, prv, group))
    requests = dist.batch_isend_irecv(ops)
    if stats is not None:
        stats.add("ring_p2p", sum(_nbytes(t) for t in tensors))

    def wait() -> list[torch.Tensor]:
        for req in requests:
            req.wait()
        return received

    return wait


def all_reduce_sum(x: torch.Tensor, *, group, stats: CommStats | None) -> torch.Tensor:
    """Sum `x` over the group (a copy; `x` is left as it was)."""
    if group is None:
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    if stats is not None:
        stats.add("all_reduce", _nbytes(out))
    return out
