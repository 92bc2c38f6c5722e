"""MagCache (Ma et al., NeurIPS'25): skip the whole block stack while the accumulated error of the
calibrated magnitude ratios stays small, reusing the stack's last residual.

The residual r = (last block's output − first block's input) shrinks or grows from step to step
by a model-specific, nearly prompt-independent ratio |r_t| / |r_t−1|, calibrated once
(`mag_ratios`, per step and branch; published tables for Wan 2.1, Wan 2.2 and HunyuanVideo in
caching/magcache_presets.py). At each step s of a branch, from the retention step on:

    ratio *= mag_ratios[s];  steps += 1;  error += |1 − ratio|
    skip  iff  a residual is cached  and  error <= threshold  and  steps <= max_skip_steps
    otherwise compute, and ratio, steps, error restart at 1, 0, 0

and a skipped forward returns its input plus the cached residual (the text stream, which no
later layer reads, passes through). This is diffusers' `MagCacheConfig` hook's rule, and unison
follows its conventions exactly, so that a diffusers setting decides the same here:
- `<=` in both tests (MagCache's own Wan code skips on error `<` threshold);
- the retention step is int(retention_ratio · steps + 0.5), rounding halves up, in steps of one
  branch (MagCache's Wan code truncates int(2 · steps · retention_ratio) on its interleaved call
  counter), and steps before it always compute;
- ratios of another length are resampled to the run's step count by nearest neighbour,
  index round(i · (L − 1) / (steps − 1)) with ties to even (torch.round in float32), and a
  one-step run takes the last ratio; a step past the ratios' end counts as ratio 1.0.
The accumulation runs in float64 here (diffusers' in float32 tensors): the two decide alike
unless the accumulated error lands within float32 rounding of the threshold.

Branches (cache contexts cond / uncond) keep their own accumulators and residual and read their
own ratios (Wan's published tables are per branch); the step s is the loop's step index, so each
of Wan 2.2 A14B's experts (a cache each) reads the run's table at the steps it runs, with the
retention window counted over the whole run, and starts by computing. Its first step's ratio is
therefore never read for a decision; the authors' A14B tables hold there the ratio across the
switch (low-noise expert's residual over the high-noise expert's last: 0.655 at step 26 of 40 in
wan2.2-t2v-a14b), and calibration writes the same (`previous_expert`).

Decisions: schedule-only. Given the ratios, whether a step skips depends only on the step, the
constants and the branch's earlier decisions, never on tensor data: every rank decides alike with
no message (a test counts the collectives). Under sequence parallelism each rank keeps the
residual of its own shard. Verify mode cross-checks the decisions anyway. Not under PipeFusion
(its stages would need the gate protocol First-Block Cache has).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Calibration, CacheConfig, Kind, Site
from unison.caching.planning import ModelShape, Saves
from unison.caching.stack import StackCache, StackState
from unison.caching.magcache_presets import PRESETS


@dataclass(frozen=True, kw_only=True)
class MagCacheConfig(CacheConfig):
    kind: str = field(default="magcache", init=False)
    """magcache."""
    threshold: float = 0.12
    """Skip while the accumulated magnitude-ratio error is at most this (MagCache's Wan 2.1
    default; its README's E012, E024 ... name it). 0 skips only where the ratios are exactly 1."""
    max_skip_steps: int = 2
    """K: at most this many steps in a row reuse the residual (0: never skips)."""
    retention_ratio: float = 0.2
    """R: the first int(R · steps + 0.5) steps always compute."""
    preset: str | None = None
    """A published table of ratios (caching/magcache_presets.py): wan2.1-t2v-1.3b,
    wan2.1-t2v-14b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, wan2.2-t2v-a14b, wan2.2-i2v-a14b,
    wan2.2-ti2v-5b, wan2.2-ti2v-5b-i2v, hunyuanvideo-720p, hunyuanvideo-544p. Left out (with
    mag_ratios) on a folder of one of those checkpoints, the plan detects it from the folder's
    transformer config and names it in the resolved config (engine/cache_presets.py)."""
    mag_ratios: tuple[float, ...] | None = None
    """Instead of a preset: the ratios per step of the conditional branch (and of the other
    branch too, unless mag_ratios_uncond is given), at least 2, resampled to the run's steps."""
    mag_ratios_uncond: tuple[float, ...] | None = None
    """The unconditional branch's ratios per step (null: mag_ratios)."""
    calibrate: bool = False
    """Measure this model's ratios instead (`unison calibrate --cache magcache`): never skips, and
    records per branch mean(|r_t| / |r_t−1|) over the tokens, as diffusers' calibration mode."""

    def __post_init__(self):
        for name in ("mag_ratios", "mag_ratios_uncond"):  # a list from Python code: frozen, comparable
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(r) for r in getattr(self, name)))
        super().__post_init__()
        self.at_least(threshold=0, max_skip_steps=0)
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be between 0 and 1, got {self.retention_ratio}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.preset is not None and self.mag_ratios is not None:
            raise ValueError("preset and mag_ratios both given: give one")
        if self.mag_ratios_uncond is not None and self.mag_ratios is None:
            raise ValueError("mag_ratios_uncond needs mag_ratios (the conditional branch's)")
        for name in ("mag_ratios", "mag_ratios_uncond"):
            ratios = getattr(self, name)
            if ratios is not None and len(ratios) < 2:
                raise ValueError(f"{name} needs at least 2 values (first and last step) to be resampled to the "
                                 f"run's steps, got {len(ratios)}")
            if ratios is not None and min(ratios) <= 0:
                raise ValueError(f"{name} must be positive, got {min(ratios)}")

    def check_complete(self) -> None:
        if self.preset is None and self.mag_ratios is None and not self.calibrate:
            raise ValueError(f"mag_ratios must be given: MagCache needs this model's per-step magnitude ratios; "
                             f"set cache.preset (one of {', '.join(PRESETS)}) or cache.mag_ratios, or measure "
                             f"them with `unison calibrate --cache magcache`")

    def branch_ratios(self) -> dict[str, tuple[float, ...]]:
        """{"cond": ..., "uncond": ...}: each branch's ratios as given (before resampling)."""
        if self.calibrate:
            return {"cond": (1.0, 1.0), "uncond": (1.0, 1.0)}  # never read: calibration computes every step
        if self.preset is not None:
            cond, uncond = PRESETS[self.preset].branches()
        else:
            self.check_complete()
            cond, uncond = self.mag_ratios, self.mag_ratios_uncond or self.mag_ratios
        return {"cond": tuple(cond), "uncond": tuple(uncond)}


def resample(ratios: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """`ratios` at `steps` evenly spaced points by nearest neighbour (see the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if len(ratios) == steps:
        return tuple(ratios)
    if steps == 1:
        return (ratios[-1],)
    scale = (len(ratios) - 1) / (steps - 1)
    picks = torch.round(torch.arange(steps, dtype=torch.float32) * scale).long().tolist()
    return tuple(ratios[i] for i in picks)


def retention_step(retention_ratio: float, steps: int) -> int:
    """The first step that may skip."""
    return int(retention_ratio * steps + 0.5)


@dataclass
class _State(StackState):
    ratio: float = 1.0
    """The product of the ratios since the last computed step."""
    steps: int = 0
    """Steps accumulated since then."""
    error: float = 0.0
    """Σ |1 − ratio| since then."""


class MagCache(StackCache):
    name = "magcache"
    decides = "schedule-only"
    state_type = _State

    def __init__(self, transformer, config: MagCacheConfig, *, blocks: list[torch.nn.Module], agreement: Agreement,
                 valid_tokens: Callable[[], int | None] = lambda: None):
        super().__init__(transformer, blocks=blocks, agreement=agreement)
        self.config, self.valid_tokens = config, valid_tokens
        self.measured: dict[str, list[float]] = {}
        """Calibrating: each branch's measured ratio per step."""
        self.given = config.branch_ratios()
        self.ratios: dict[str, tuple[float, ...]] = {}
        """Each branch's ratios resampled to this video's steps (`begin_video`)."""
        self.first = 0
        """The retention step of this video."""
        self.previous_expert: MagCache | None = None
        """Calibrating Wan 2.2 A14B's low-noise expert: the high-noise expert's cache. This
        expert's first ratio in each branch is then measured against that cache's last residual
        of the branch, across the switch, as MagCache's authors' Wan 2.2 tables record it."""

    def begin_video(self, *, steps: int) -> None:
        super().begin_video(steps=steps)
        self.ratios = {branch: resample(ratios, steps) for branch, ratios in self.given.items()}
        self.first = retention_step(self.config.retention_ratio, steps)

    def _decide_forward(self, state: _State, args, kwargs) -> bool:
        if not self.ratios:
            raise RuntimeError("MagCache was not told the video's steps (Cache.begin_video)")
        if self.step < self.first or self.config.calibrate:
            return True
        ratios = self.ratios.get(self.context, self.ratios["cond"])
        state.ratio *= ratios[self.step] if self.step < len(ratios) else 1.0
        state.steps += 1
        state.error += abs(1.0 - state.ratio)
        if state.residual is not None and state.error <= self.config.threshold \
                and state.steps <= self.config.max_skip_steps:
            return False
        state.ratio, state.steps, state.error = 1.0, 0, 0.0
        return True


    def _keep(self, state: _State, residual: torch.Tensor) -> None:
        """Calibrating: the ratio of this residual's per-token norms to the branch's previous one,
        averaged over the tokens (1.0 at the branch's first forward), as diffusers' calibration
        mode measures it. Under sequence parallelism each rank sums its real tokens' ratios and
        the sums and counts are added over the group (float64), so N ranks measure what one does.
        A low-noise expert's first forward in a branch compares with `previous_expert`'s residual."""
        if self.config.calibrate:
            ratio, before = 1.0, state.residual
            if before is None and self.previous_expert is not None:
                last = self.previous_expert.states.get(self.context)
                before = last.residual if last is not None else None
            if before is not None:
                rows = self.valid_tokens()
                now, before = (r if rows is None else r[:, :rows] for r in (residual, before))
                per_token = torch.linalg.norm(now.float(), dim=-1) / (torch.linalg.norm(before.float(), dim=-1) + 1e-8)
                ratio = self.agreement.ratio(per_token.sum(dtype=torch.float64),
                                             torch.tensor(float(per_token.numel()), dtype=torch.float64))
            self.measured.setdefault(self.context, []).append(ratio)
        super()._keep(state, residual)

    def reset(self) -> None:
        super().reset()
        self.measured = {}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "measured": {k: list(v) for k, v in self.measured.items()}}

    def load_extra_state(self, data: dict) -> None:
        super().load_extra_state(data)
        self.measured = {k: list(v) for k, v in data.get("measured", {}).items()}


def apply_mag_cache(transformer, config: MagCacheConfig, *, group=None, blocks: list[torch.nn.Module],
                    valid_tokens: Callable[[], int | None] = lambda: None, stats=None) -> MagCache:
    """Apply MagCache to `transformer`'s `blocks` (in execution order). `group`: the ranks sharing
    the blocks' collectives, used by verify mode and by calibration's sums (decisions need no
    agreement); `valid_tokens()`: real tokens at the start of this rank's shard."""
    return MagCache(transformer, config, blocks=blocks, valid_tokens=valid_tokens,
                    agreement=Agreement(group=group, stats=stats, verify=config.verify))


def _attach(transformer, config: MagCacheConfig, site: Site) -> MagCache:
    return apply_mag_cache(transformer, config, group=site.group, blocks=site.blocks, valid_tokens=site.valid_tokens,
                           stats=site.stats)


def state_per_token(shape: ModelShape, config: MagCacheConfig) -> float:
    """One hidden-size tensor per token and branch: the block stack's residual."""
    return 1


# Skip share assumed: 0.5. MagCache's README (../shared/cache-facts.md section 3.2): Wan 2.1 1.3B
# at E012K2R02 takes 87 s of the uncached 189 s on an A800, so about half the steps skip.
DIGITS = 8
"""Significant digits a calibration writes per ratio (float64 sums on N ranks differ from one
rank's only far below)."""


def _link(caches: list) -> None:
    """Each expert's cache after the first takes its first ratio per branch across the switch."""
    for before, after in zip(caches, caches[1:]):
        after.previous_expert = before


def _run_table(caches: dict) -> dict[str, list[float]]:
    """Per branch, one ratio per step of the run, each from the expert that ran the step."""
    by_step: dict[str, dict[int, float]] = {}
    for cache in caches.values():
        for context, ratios in cache.measured.items():
            steps = [d[0] for d in cache.decisions if d[1] == context]
            by_step.setdefault(context, {}).update(zip(steps, ratios))
    return {context: [ratios[s] for s in sorted(ratios)] for context, ratios in by_step.items()}


def _calibrated(caches: dict):
    """The measured ratios as the run's config (one run-wide table for both experts of Wan 2.2
    A14B, each at the steps it ran; see launch/cache_calibration.py)."""
    measured = _run_table(caches)
    ratios = {branch: tuple(float(f"{r:.{DIGITS}g}") for r in values) for branch, values in measured.items()}
    uncond = ratios.get("uncond")
    cache = MagCacheConfig(mag_ratios=ratios["cond"],
                           mag_ratios_uncond=uncond if uncond is not None and uncond != ratios["cond"] else None)
    return (cache, None, "MagCache ratios measured by `unison calibrate` (one per step and branch)",
            f"MagCache ratios for {len(measured['cond'])} steps, branches {', '.join(sorted(measured))}")


CALIBRATION = Calibration(min_steps=2, why="a ratio per step, first and last",
                          config=lambda: MagCacheConfig(calibrate=True), result=_calibrated, link=_link)


KIND = Kind(name="magcache", title="MagCache", config=MagCacheConfig, attach=_attach, decides=MagCache.decides,
            presets=PRESETS, saves=Saves.BLOCK_STACK, state_per_token=state_per_token, default_skip_share=0.5,
            calibration=CALIBRATION)
