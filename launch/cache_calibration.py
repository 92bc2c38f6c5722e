"""`unison calibrate --cache magcache|teacache`: measure what a model's cache needs and write it as a recipe.

One render that never skips, with the cache in calibration mode, on every expert transformer
(Wan 2.2 A14B's two each measure at the steps they run). Under sequence parallelism (Ulysses,
Ring) every sum is float64 and added over the ranks (`Agreement.ratio`), so N ranks measure what
one does. Not under CFG or patch parallelism (a half would hold one branch only; patches are
approximate): refused before loading. Rank 0 writes the recipe (verified, then renamed into
place): the model, the sampling settings it was measured at and the cache.

What is measured and how it becomes a config is each kind's (its `Kind.calibration`):

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

from unison.caching import registry
from unison.engine.config import RunConfig, dump_yaml
from unison.engine.errors import UserError


def _calibrated_kinds() -> list[str]:
    return [name for name, kind in registry.KINDS.items() if kind.calibration is not None]


def calibration_config(config: RunConfig, kind: str) -> RunConfig:
    """The render that measures: the run's settings, the cache calibrating on every expert,
    nothing decoded or written."""
    if kind not in _calibrated_kinds():
        raise UserError(f"calibrate: {' or '.join('--cache ' + k for k in _calibrated_kinds())} can be calibrated, "
                        f"got {kind!r}")
    p = config.parallel
    if p.cfg > 1 or p.patch > 1:
        raise UserError("calibrate runs under Ulysses and Ring only (a CFG half sees one branch; patches are "
                        f"approximate): got cfg {p.cfg}, patch {p.patch}")
    output = dataclasses.replace(config.output, decode=False, save_latents=None, checkpoint_every=0)
    return dataclasses.replace(config, cache=registry.get(kind).calibration.config(), cache_2=None, output=output)


def _link_experts(engine, link):
    """on_phase: once the render has applied its caches, each expert's cache learns the one
    before it (the kind's `link`)."""
    def phase(name: str, step: int, total: int) -> None:
        if name == "encoding":
            link([engine.caches[n] for n in engine.plan.spec.experts if n in engine.caches])
    return phase


def run(config: RunConfig, out: str | Path, env, *, reads: dict[str, str] | None = None) -> int:
    from unison.engine.plan import plan_run
    from unison.engine.render import Engine
    from unison.engine.targets import check_landings, check_writable, picture_reads
    from unison.engine.io.writes import commit, text_write

    kind = config.cache.kind
    measuring = calibration_config(config, kind)
    calibration = registry.get(kind).calibration
    plan = plan_run(measuring, world_size=env.world_size, local_rank=env.local_rank, reads=reads)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the recipe's file name")
    check_writable(out, what="--out")
    check_landings({"--out": str(out)}, model_path=plan.config.model.path,
                   reads={**(reads or {}), **picture_reads(config.sampling)})
    steps = plan.config.sampling.steps
    if steps < calibration.min_steps:  # before anything loads
        raise UserError(f"calibrate --cache {kind} needs at least {calibration.min_steps} steps ({calibration.why}), "
                        f"got {steps}")
    with env.joined(timeout_s=plan.config.parallel.timeout_s, placement=plan.placement):
        engine = Engine(plan)
        engine.render(on_phase=_link_experts(engine, calibration.link) if calibration.link is not None else None)
        caches = {name: engine.caches[name] for name in plan.spec.experts}
    settings = dataclasses.replace(plan.config, output=config.output)
    try:
        cache, cache_2, header, line = calibration.result(caches)
    except ValueError as err:
        raise UserError(f"calibrate: {err}") from None
    result = dataclasses.replace(settings, cache=cache, cache_2=cache_2)
    if env.rank == 0:
        commit(text_write(out, f"# {header}\n" + dump_yaml(result)))
        print(f"wrote     {out}: {line}", file=sys.stdout)
    return 0
