"""ParallelDims: the topology of one engine's ranks, and its process groups.

Rank layout, innermost first: ulysses, ring, patch, cfg. Ulysses ranks are contiguous (inside a
node, where all-to-all is cheap); ring, patch and cfg stride across. Every group is created with
the configured timeout, so a stuck collective fails instead of hanging.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from unison.engine.errors import UserError

AXES = ("cfg", "patch", "ring", "ulysses")
"""Mesh axes, outermost first."""


@dataclass(frozen=True)
class ParallelDims:
    cfg: int = 1
    patch: int = 1
    ring: int = 1
    ulysses: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        degrees = {axis: getattr(self, axis) for axis in AXES}
        for axis, value in degrees.items():
            if value < 1:
                raise UserError(f"parallel.{axis} must be at least 1, got {value}")
        if self.cfg not in (1, 2):
            raise UserError(f"parallel.cfg must be 1 or 2 (two guidance branches), got {self.cfg}")
        product = self.cfg * self.patch * self.ring * self.ulysses
        if product != self.world_size:
            raise UserError(
                f"parallel degrees ulysses {self.ulysses} x ring {self.ring} x cfg {self.cfg} x patch "
                f"{self.patch} = {product} must equal the world size {self.world_size}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: the ranks that split one branch's tokens."""
        return self.ring * self.ulysses

    def coords(self, rank: int) -> dict[str, int]:
        out, rest = {}, rank
        for axis, size in reversed(list(zip(AXES, self.shape))):
            out[axis] = rest % size
            rest //= size
        return {axis: out[axis] for axis in AXES}

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis, size in zip(AXES, self.shape):
            rank = rank * size + coords[axis]
        return rank

    def group_ranks(self, axes: tuple[str, ...]) -> list[list[int]]:
        """All rank lists that vary along `axes` (in mesh order) with the other axes fixed."""
        fixed = [a for a in AXES if a not in axes]
        groups = []
        for fixed_values in itertools.product(*(range(getattr(self, a)) for a in fixed)):
            base = dict(zip(fixed, fixed_values))
            ranks = [self.rank_of({**base, **dict(zip(axes, v))})
                     for v in itertools.product(*(range(getattr(self, a)) for a in axes))]
            groups.append(sorted(ranks))
        return groups

    def describe(self) -> list[str]:
        lines = [f"mesh       cfg {self.cfg} x patch {self.patch} x ring {self.ring} x ulysses "
                 f"{self.ulysses} on {self.world_size} ranks"]
        for name, axes in GROUP_AXES.items():
            if all(getattr(self, a) == 1 for a in axes):
                continue
            lines.append(f"  {name:<8} groups " + " ".join(str(g) for g in self.group_ranks(axes)))
        return lines


GROUP_AXES = {"ulysses": ("ulysses",), "ring": ("ring",), "sp": ("ring", "ulysses"), "cfg": ("cfg",),
              "patch": ("patch",), "tokens": ("patch", "ring", "ulysses"),
              "cfg_tokens": ("cfg", "patch", "ring", "ulysses")}
"""sp: the ranks that split one branch's tokens for exact attention; tokens: all ranks that split
one branch's tokens (sp or patch), which share the transformer blocks' collectives; cfg_tokens:
both branches' token ranks (the whole engine)."""


@dataclass
class Groups:
    """This rank's process groups, one per axis (None for a group of one rank)."""

    dims: ParallelDims
    rank: int
    groups: dict[str, object] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def get(self, name: str):
        return self.groups.get(name)

    def size(self, name: str) -> int:
        return len(self.ranks.get(name, [self.rank]))

    def index(self, name: str) -> int:
        return self.ranks.get(name, [self.rank]).index(self.rank)


def build_groups(dims: ParallelDims, *, rank: int, timeout_s: float) -> Groups:
    """Create every group of the layout (all ranks call this in the same order). A library that
    takes a mesh gets one built from a group (parallel/shard.py), so its groups carry our timeout."""
    out = Groups(dims=dims, rank=rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    for name, axes in GROUP_AXES.items():
        for ranks in dims.group_ranks(axes):
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                out.groups[name], out.ranks[name] = group, ranks
    return out
