"""What a cache kind tells `unison plan` about itself (its `Kind` carries it): what a skipped step
saves, the state it keeps per token, and the share of steps the planner assumes it skips.

The planner (engine/planner/layouts.py) hands a kind the model's sizes as a `ModelShape` and one
forward's FLOPs as a `StepWork`; caching/ never imports engine/, so these two small records are
the whole protocol between them. The planner holds no table of cache names: a kind it does not
know is one the registry does not know, refused by `registry.get`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The sizes of the transformer a cache is planned for, read from its config (no weights)."""

    joint_text: bool
    """Text and video tokens attend jointly in one attention per block (HunyuanVideo); False:
    video tokens self-attend and cross-attend to the text (Wan)."""
    blocks: int
    """Transformer blocks per forward, each with one sequence-parallel attention (Wan: its blocks;
    HunyuanVideo: its dual-stream plus single-stream blocks)."""
    single_blocks: int
    """Of `blocks`, the single-stream ones (HunyuanVideo's; 0 for Wan)."""
    hidden: int
    """Heads x head_dim: the width of one hidden-size tensor per token."""
    out_per_token: int
    """The final projection's outputs per token: out_channels x patch volume."""

    @property
    def dual_blocks(self) -> int:
        """The blocks that are not single-stream (every Wan block; HunyuanVideo's dual-stream ones)."""
        return self.blocks - self.single_blocks


@dataclass(frozen=True, kw_only=True)
class StepWork:
    """One forward's FLOPs as the planner counts them (on the meta device), split where a skip cuts."""

    total: float
    """Everything: embeddings, blocks, output head."""
    blocks: float
    """Inside the transformer blocks (linear and attention)."""
    attention: float
    """Of the blocks' FLOPs, attention's."""
    block_count: int
    """The blocks those FLOPs are spread over (`ModelShape.blocks`)."""


class Saves(str, enum.Enum):
    """What a skipped step does not run, as a named part of one forward."""

    BLOCKS_AFTER_FIRST = "blocks after the first"
    """Every block but the first, which runs to decide (First-Block Cache; DBCache at F1B0)."""
    BLOCK_STACK = "block stack"
    """Every block; the embeddings and output head still run (MagCache, TeaCache, TaylorSeer)."""
    WHOLE_TRANSFORMER = "whole transformer"
    """The whole forward (EasyCache, which decides on the latents before it)."""
    ATTENTION = "attention"
    """The attention of the blocks (Pyramid Attention Broadcast), counted as attention FLOPs only."""

    def skipped(self, work: StepWork, *, steps: float) -> float:
        """Share of the forwards' FLOPs not run when a share `steps` of the steps skip."""
        if self is Saves.BLOCKS_AFTER_FIRST:
            return steps * work.blocks * (work.block_count - 1) / work.block_count / work.total
        if self is Saves.BLOCK_STACK:
            return steps * work.blocks / work.total
        if self is Saves.WHOLE_TRANSFORMER:
            return steps
        return steps * work.attention / work.total
