"""DBCache (cache-dit's "Fn/Bn" dual-block cache): First-Block Cache with Fn blocks in front and Bn
blocks at the back.

The first `front_blocks` (Fn) blocks always run; the residual of their output against the first
block's input decides, by First-Block Cache's criterion (relative mean absolute change against the
last computed step, Σ|r − r_prev| / Σ|r_prev| <= threshold -> skip). A skipped forward adds the
middle blocks' residual from the last computed step to the front's output, then the last
`back_blocks` (Bn) blocks always run on it, which corrects part of the reuse's error. Fn = 1,
Bn = 0 is First-Block Cache (`fbcache`, the same code).

With `calibrator: taylorseer` (cache-dit's TaylorSeer calibrator) the middle residual is not
reused as it was: each computed step updates its Taylor factors (caching/taylorseer.py: divided
differences over this transformer's steps, `calibrator_order` of them) and a skipped step adds
their extrapolation to it, Σk Fk · d^k / k!, d the steps since the last computed one. Until two
steps have computed that is the last residual. The calibrator never changes a decision (the
front's residual decides), only what a skip adds; it costs (order + 1) residuals per branch
instead of one.

Gates before the change is measured, in this order (each depends only on the step and the
branch's decision history, so every rank takes it alike, with no message): the first step and
`warmup_steps` compute; at most `max_consecutive_skips` skips in a row and `max_cached_steps`
skips per video and branch; a fixed `step_mask` (one 0/1 per step, 1 = must compute) — with
`mask_policy: dynamic` (cache-dit's default) a 0 step still tests the threshold, with `static` it
skips unconditionally (then that step's decision is schedule-only).

Decisions: data-dependent (the front blocks' residual), agreed as First-Block Cache's: both sums
over this rank's real tokens, all-reduced in float64 over exactly the ranks that share the blocks'
collectives (the sequence- or patch-parallel group; with joint_cfg under CFG parallelism, both
halves), before any rank branches. Not under PipeFusion (its gate protocol is the first block's):
a clear error.

Published settings (../shared/cache-facts.md): cache-dit's defaults Fn 1, Bn 0, threshold 0.12,
warm-up 8, at most 3 consecutive cached steps; Wan 2.2 A14B per expert: high-noise warm-up 4 and
at most 8 cached steps, low-noise warm-up 2 and 20; F8B0 with the TaylorSeer calibrator (order 1)
on Wan 2.1 1.3B (FastVideo's measurement). Note cache-dit skips when the change is
strictly below the threshold; we follow diffusers' First-Block Cache (at or below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unison.caching import taylorseer
from unison.caching.agree import Agreement
from unison.caching import fbcache
from unison.caching.base import Kind, Site
from unison.caching.planning import Saves
from unison.caching.fbcache import FirstBlockCache, FirstBlockCacheConfig


@dataclass(frozen=True, kw_only=True)
class DBCacheConfig(FirstBlockCacheConfig):
    kind: str = field(default="dbcache", init=False)
    """dbcache."""
    front_blocks: int = 1
    """Fn: blocks that always run first; the last of them decides."""
    back_blocks: int = 0
    """Bn: blocks that always run last, on the reused middle's output."""
    max_cached_steps: int | None = None
    """At most this many skipped steps per video and branch (None: no limit)."""
    step_mask: tuple[int, ...] | None = None
    """One 0/1 per denoising step, 1: the step must compute (None: no mask)."""
    mask_policy: Literal["dynamic", "static"] = "dynamic"
    """dynamic: a 0 in the mask lets the threshold decide; static: a 0 skips (after the gates)."""
    calibrator: Literal["none", "taylorseer"] = "none"
    """taylorseer: a skipped step adds the middle residual Taylor-extrapolated from the computed
    steps' (cache-dit's TaylorSeer calibrator) instead of the last one as it was."""
    calibrator_order: int = 1
    """The calibrator's Taylor order (cache-dit's taylorseer_order)."""

    def __post_init__(self):
        super().__post_init__()
        self.at_least(front_blocks=1, back_blocks=0)
        self.at_least(max_cached_steps=0, nullable=True)
        if self.step_mask is not None and (not self.step_mask or any(m not in (0, 1) for m in self.step_mask)):
            raise ValueError(f"step_mask must be a list of 0 and 1 (1: the step computes), got {list(self.step_mask)}")
        if self.mask_policy not in ("dynamic", "static"):
            raise ValueError(f"mask_policy must be dynamic or static, got {self.mask_policy!r}")
        if self.calibrator not in ("none", "taylorseer"):
            raise ValueError(f"calibrator must be none or taylorseer, got {self.calibrator!r}")
        self.at_least(calibrator_order=0)

    def check_run(self, *, steps: int) -> None:
        if self.step_mask is not None and len(self.step_mask) != steps:
            raise ValueError(f"step_mask has {len(self.step_mask)} entries but the run has {steps} steps")


class DualBlockCache(FirstBlockCache):
    name = "dbcache"

    def _forced(self, state) -> bool | None:
        forced = super()._forced(state)
        if forced is not None:
            return forced
        c = self.config
        if c.max_cached_steps is not None and state.skips >= c.max_cached_steps:
            return True
        if c.step_mask is not None:
            if c.step_mask[self.step]:
                return True
            if c.mask_policy == "static":
                return False
        return None

    def _keep_tail(self, state, tail: tuple) -> None:
        """With the calibrator the residual updates its Taylor factors (in its own dtype; the
        residual itself is not kept twice: order 0 is it)."""
        if self.config.calibrator == "none":
            return super()._keep_tail(state, tail)
        elapsed = None if state.tail_step is None else self.own_step - state.tail_step
        parts = tuple(part for part in tail if part is not None)
        state.tail_factors = taylorseer.update(state.tail_factors, parts, elapsed, self.config.calibrator_order,
                                               parts[0].dtype)
        state.tail_step, state.tail_residual = self.own_step, None

    def _reused_tail(self, state) -> tuple:
        if self.config.calibrator == "none":
            return super()._reused_tail(state)
        parts = taylorseer.predict(state.tail_factors, self.own_step - state.tail_step,
                                   [f[0].dtype for f in state.tail_factors])
        return (parts[0], parts[1] if len(parts) > 1 else None)


def apply_dbcache(transformer, config: DBCacheConfig, *, blocks, group=None, valid_tokens=lambda: None,
                  stats=None) -> DualBlockCache:
    """Apply DBCache to `transformer`'s `blocks` (in execution order); `group` and `valid_tokens`
    as for First-Block Cache."""
    return DualBlockCache(transformer, config, blocks=blocks, valid_tokens=valid_tokens,
                          agreement=Agreement(group=group, stats=stats, verify=config.verify),
                          front=config.front_blocks, back=config.back_blocks)


def _attach(transformer, config: DBCacheConfig, site: Site) -> DualBlockCache:
    group = site.cfg_group if config.joint_cfg and site.cfg_group is not None else site.group
    return apply_dbcache(transformer, config, blocks=site.blocks, group=group, valid_tokens=site.valid_tokens,
                         stats=site.stats)


# Planned as First-Block Cache is, at its default F1B0 (the deciding block's residual and the
# reused one's; every block but the first skipped), with its skip share assumed alike: 0.4.
KIND = Kind(name="dbcache", title="DBCache", config=DBCacheConfig, attach=_attach, decides=DualBlockCache.decides,
            saves=Saves.BLOCKS_AFTER_FIRST, state_per_token=fbcache.state_per_token, default_skip_share=0.4)
