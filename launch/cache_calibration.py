"""`unison calibrate --cache magcache`: measure a model's MagCache ratios and write them as a recipe.

One render that never skips, with MagCache in calibration mode (caching/magcache.py): per branch
and step, the mean over the tokens of |r_t| / |r_t−1|, r the block stack's residual. Under
sequence parallelism (Ulysses, Ring) the sums and counts are added over the ranks, so N ranks
write the file one rank writes. Not under CFG or patch parallelism (a half would hold one branch
only; patches are approximate): refused before loading. TeaCache's coefficients are fitted over
many prompts and steps; its calibration is not built yet.

The recipe holds the model, the sampling settings it was measured at and `cache: {kind: magcache,
mag_ratios: [...], mag_ratios_uncond: [...]}`; rendering with it resamples the ratios to the run's
steps. Rank 0 writes it (verified, then renamed into place).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from unison.caching.magcache import MagCacheConfig
from unison.engine.config import RunConfig, dump_yaml
from unison.errors import UserError

DIGITS = 8
"""Significant digits written per ratio (float64 sums on N ranks differ from one rank's only far below)."""


def calibration_config(config: RunConfig, kind: str) -> RunConfig:
    """The render that measures: the run's settings, MagCache calibrating, nothing decoded or written."""
    if kind != "magcache":
        raise UserError(f"calibrate: --cache magcache is the kind that can be calibrated (teacache's "
                        f"coefficients are not fitted here yet), got {kind!r}")
    p = config.parallel
    if p.cfg > 1 or p.patch > 1:
        raise UserError("calibrate runs under Ulysses and Ring only (a CFG half sees one branch; patches are "
                        f"approximate): got cfg {p.cfg}, patch {p.patch}")
    output = dataclasses.replace(config.output, decode=False, save_latents=None, checkpoint_every=0)
    return dataclasses.replace(config, cache=MagCacheConfig(calibrate=True), output=output)


def recipe(config: RunConfig, measured: dict[str, list[float]]) -> RunConfig:
    """`config` with the measured ratios as its cache (the settings MagCache's README uses for Wan)."""
    ratios = {branch: tuple(float(f"{r:.{DIGITS}g}") for r in values) for branch, values in measured.items()}
    uncond = ratios.get("uncond")
    cache = MagCacheConfig(mag_ratios=ratios["cond"],
                           mag_ratios_uncond=uncond if uncond is not None and uncond != ratios["cond"] else None)
    return dataclasses.replace(config, cache=cache)


def run(config: RunConfig, out: str | Path, env) -> int:
    from unison.engine.build import plan_run
    from unison.engine.render import Engine
    from unison.engine.writes import commit, text_write

    measuring = calibration_config(config, config.cache.kind)
    plan = plan_run(measuring, world_size=env.world_size, local_rank=env.local_rank)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the recipe's file name")
    if len(plan.spec.experts) > 1:  # before anything loads
        raise UserError("calibrate: models with two experts (Wan 2.2 A14B) are not calibrated yet")
    with env.joined(timeout_s=plan.config.parallel.timeout_s, placement=plan.placement):
        engine = Engine(plan)
        engine.render()
        [cache] = engine.caches.values()
        measured = cache.measured
    if env.rank == 0:
        result = recipe(dataclasses.replace(plan.config, output=config.output), measured)
        commit(text_write(out, "# MagCache ratios measured by `unison calibrate` (one per step and branch)\n"
                               + dump_yaml(result)))
        steps = len(measured["cond"])
        print(f"wrote     {out}: MagCache ratios for {steps} steps, branches {', '.join(sorted(measured))}",
              file=sys.stdout)
    return 0
