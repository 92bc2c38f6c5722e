"""`unison calibrate --cache magcache|teacache`: measure what a model's cache needs and write it as a recipe.

One render that never skips, with the cache in calibration mode, on every expert transformer
(Wan 2.2 A14B's two each measure at the steps they run). Under sequence parallelism (Ulysses,
Ring) every sum is float64 and added over the ranks (`Agreement.ratio`), so N ranks measure what
one does. Not under CFG or patch parallelism (a half would hold one branch only; patches are
approximate): refused before loading. Rank 0 writes the recipe (verified, then renamed into
place): the model, the sampling settings it was measured at and the cache.

MagCache (caching/magcache.py): per branch and step, the mean over the tokens of |r_t| / |r_t−1|,
r the block stack's residual; `cache: {kind: magcache, mag_ratios: [...], mag_ratios_uncond:
[...]}`, resampled to the run's steps when rendering. Rendering reads one run-wide table at the
loop's step index for both of Wan 2.2 A14B's experts, so the two experts' measurements are written
as one table, each at the steps its expert ran; at the low-noise expert's first step the ratio is
taken across the switch (its residual over the high-noise expert's last one), as the authors'
published A14B tables hold (0.655 at step 26 of 40). Rendering never decides on that value: each
expert's cache starts by computing.

TeaCache (caching/teacache.py): TeaCache skips while the accumulated poly(x) stays small, x the
relative L1 change of a cheap indicator (Wan: the timestep modulation; HunyuanVideo: the first
block's modulated input). The polynomial is what makes x a stand-in for the quantity that
matters, how much the model's output changes: TeaCache's paper fits the output difference
against the indicator difference. So calibration records, per branch and step (from each
branch's second forward on), x exactly as the decision measures it (the same sums, agreed over
the ranks where the indicator is split with the tokens) and y = Σ|o_t − o_t−1| / Σ|o_t−1|, o the
block stack's output hidden states (this rank's real tokens, sums added over the ranks), and fits
y ≈ poly(x) by least squares, numpy.polyfit of degree 4 over the pairs of both branches, highest
power first (the form of TeaCache's published coefficients). Wan 2.2 A14B's experts have their own
indicator weights and outputs: one polynomial each, written as `cache` (high noise) and `cache_2`
(low noise). A fit needs at least 5 distinct x (every step after an expert's first gives one).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from unison.caching.magcache import MagCacheConfig
from unison.caching.teacache import TeaCacheConfig
from unison.engine.config import RunConfig, dump_yaml
from unison.engine.errors import UserError

DIGITS = 8
"""Significant digits written per ratio (float64 sums on N ranks differ from one rank's only far below)."""
COEFFICIENT_DIGITS = 10
"""Significant digits written per TeaCache coefficient (TeaCache publishes 9)."""
DEGREE = 4
"""Degree of the TeaCache polynomial fitted (TeaCache's published fits are 4th degree)."""
KINDS = {"magcache": MagCacheConfig, "teacache": TeaCacheConfig}
"""The kinds calibrate measures, and their configs (each has calibrate mode)."""


def calibration_config(config: RunConfig, kind: str) -> RunConfig:
    """The render that measures: the run's settings, the cache calibrating on every expert,
    nothing decoded or written."""
    if kind not in KINDS:
        raise UserError(f"calibrate: --cache magcache or --cache teacache can be calibrated, got {kind!r}")
    p = config.parallel
    if p.cfg > 1 or p.patch > 1:
        raise UserError("calibrate runs under Ulysses and Ring only (a CFG half sees one branch; patches are "
                        f"approximate): got cfg {p.cfg}, patch {p.patch}")
    output = dataclasses.replace(config.output, decode=False, save_latents=None, checkpoint_every=0)
    return dataclasses.replace(config, cache=KINDS[kind](calibrate=True), cache_2=None, output=output)


def run_table(caches: dict) -> dict[str, list[float]]:
    """MagCache: per branch, one ratio per step of the run, each from the expert that ran the step
    (`caches` in the experts' order)."""
    by_step: dict[str, dict[int, float]] = {}
    for cache in caches.values():
        for context, ratios in cache.measured.items():
            steps = [d[0] for d in cache.decisions if d[1] == context]
            by_step.setdefault(context, {}).update(zip(steps, ratios))
    return {context: [ratios[s] for s in sorted(ratios)] for context, ratios in by_step.items()}


def fit(pairs: list[tuple[int, str, float, float]], *, expert: str) -> tuple[float, ...]:
    """TeaCache: the degree-4 least-squares polynomial y ≈ poly(x) over every (x, y) pair, highest
    power first. UserError when fewer than 5 distinct x were measured."""
    import numpy as np

    x = np.array([p[2] for p in pairs], dtype=np.float64)
    y = np.array([p[3] for p in pairs], dtype=np.float64)
    if len(set(x.tolist())) <= DEGREE:
        raise UserError(f"calibrate: {expert} measured {len(set(x.tolist()))} distinct indicator changes; a "
                        f"degree-{DEGREE} fit needs at least {DEGREE + 1}: give more --steps")
    return tuple(float(c) for c in np.polyfit(x, y, DEGREE))


def recipe(config: RunConfig, measured: dict[str, list[float]]) -> RunConfig:
    """`config` with the measured MagCache ratios as its cache (the settings MagCache's README uses for Wan)."""
    ratios = {branch: tuple(float(f"{r:.{DIGITS}g}") for r in values) for branch, values in measured.items()}
    uncond = ratios.get("uncond")
    cache = MagCacheConfig(mag_ratios=ratios["cond"],
                           mag_ratios_uncond=uncond if uncond is not None and uncond != ratios["cond"] else None)
    return dataclasses.replace(config, cache=cache, cache_2=None)


def teacache_recipe(config: RunConfig, fits: list[tuple[float, ...]]) -> RunConfig:
    """`config` with the fitted polynomial as its cache (the second expert's, if any, as cache_2)."""
    caches = [TeaCacheConfig(coefficients=tuple(float(f"{c:.{COEFFICIENT_DIGITS}g}") for c in coefficients))
              for coefficients in fits]
    return dataclasses.replace(config, cache=caches[0], cache_2=caches[1] if len(caches) > 1 else None)


def _link_experts(engine):
    """on_phase: once the render has applied its caches, each MagCache after the first learns the
    one before it (its first ratio per branch is taken across the switch)."""
    def phase(name: str, step: int, total: int) -> None:
        if name == "encoding":
            caches = [engine.caches[n] for n in engine.plan.spec.experts if n in engine.caches]
            for before, after in zip(caches, caches[1:]):
                after.previous_expert = before
    return phase


def run(config: RunConfig, out: str | Path, env, *, reads: dict[str, str] | None = None) -> int:
    from unison.engine.build import plan_run
    from unison.engine.render import Engine
    from unison.engine.targets import check_landings, check_writable, picture_reads
    from unison.engine.io.writes import commit, text_write

    kind = config.cache.kind
    measuring = calibration_config(config, kind)
    plan = plan_run(measuring, world_size=env.world_size, local_rank=env.local_rank, reads=reads)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the recipe's file name")
    check_writable(out, what="--out")
    check_landings({"--out": str(out)}, model_path=plan.config.model.path,
                   reads={**(reads or {}), **picture_reads(config.sampling)})
    steps = plan.config.sampling.steps
    if kind == "magcache" and steps < 2:  # a ratio table has a first and a last step
        raise UserError(f"calibrate --cache magcache needs at least 2 steps (a ratio per step, first and last), "
                        f"got {steps}")
    if kind == "teacache" and steps < DEGREE + 2:  # before anything loads
        raise UserError(f"calibrate --cache teacache needs at least {DEGREE + 2} steps ({DEGREE + 1} changes of "
                        f"the indicator for a degree-{DEGREE} fit), got {steps}")
    with env.joined(timeout_s=plan.config.parallel.timeout_s, placement=plan.placement):
        engine = Engine(plan)
        engine.render(on_phase=_link_experts(engine) if kind == "magcache" else None)
        caches = {name: engine.caches[name] for name in plan.spec.experts}
    settings = dataclasses.replace(plan.config, output=config.output)
    if kind == "magcache":
        measured = run_table(caches)
        result, header = recipe(settings, measured), "MagCache ratios measured by `unison calibrate` " \
                                                     "(one per step and branch)"
        line = f"MagCache ratios for {len(measured['cond'])} steps, branches {', '.join(sorted(measured))}"
    else:
        fits = [fit(cache.pairs, expert=name) for name, cache in caches.items()]
        pairs = ", ".join(f"{name} {len(cache.pairs)}" for name, cache in caches.items())
        result, header = teacache_recipe(settings, fits), "TeaCache polynomial fitted by `unison calibrate` " \
                                                          "(output change against indicator change)"
        line = f"TeaCache coefficients fitted on (x, y) pairs: {pairs}"
    if env.rank == 0:
        commit(text_write(out, f"# {header}\n" + dump_yaml(result)))
        print(f"wrote     {out}: {line}", file=sys.stdout)
    return 0
