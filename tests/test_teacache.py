"""TeaCache: the rule against a hand computation with numpy on the indicators a render recorded,
the published presets, agreement on the data-dependent models under Ulysses 2, and bad input.
(The shared battery, test_cache_battery.py, covers its lockstep under every layout, and that on
Wan its decisions issue no collective under Ulysses 2.)"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from multirank import run_ranks
from test_cache_battery import refused_before_loading
from unison.caching.teacache import PRESETS
from unison.engine.plan import plan_run
from unison.engine.config import (CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig,
                                  config_from_dict, load_yaml)
from unison.engine.render import Engine
from unison.engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# A polynomial near the identity for the tiny Wan, whose timestep modulation changes by 0.41-0.46
# per step: poly(0.45) ~ 0.38, so at 0.7 it skips, computes, skips, computes.
TINY_POLY = (2.0, -1.0, 0.5, 0.6, 0.02)


def _run(family: str, cache: CacheConfig, parallel: ParallelConfig = ParallelConfig()) -> RunConfig:
    hunyuan = family == "hunyuanvideo"
    side = 64 if family == "wan2.2-ti2v" else 32  # TI2V-5B: 16x VAE and 2x2 patches, so 64 gives 4 tokens a frame
    return RunConfig(model=ModelConfig(family=family), cache=cache, parallel=parallel,
                     sampling=SamplingConfig(height=side, width=side, frames=5, steps=6, negative_prompt="blurred",
                                             true_cfg_scale=3.0 if hunyuan else None,
                                             max_sequence_length=64 if hunyuan else None),
                     output=OutputConfig(decode=False, progress=False))


def _record_indicators(engine: Engine, family: str) -> list[np.ndarray]:
    """A pre-hook on the first block that records, at every forward, TeaCache's indicator as the
    paper's code defines it, computed here by hand: Wan's timestep modulation input; HunyuanVideo's
    first block's layer norm modulated by its own shift and scale (the first two of six chunks)."""
    transformer, seen = engine.pipe.transformer, []
    first = transformer.transformer_blocks[0] if family == "hunyuanvideo" else transformer.blocks[0]

    def hook(module, args, kwargs):
        hidden, temb = args[0], args[2]
        if family == "hunyuanvideo":
            shift, scale = module.norm1.linear(torch.nn.functional.silu(temb)).chunk(6, dim=1)[:2]
            hidden = module.norm1.norm(hidden) * (1 + scale[:, None]) + shift[:, None]
            seen.append(hidden.double().numpy())
        else:
            seen.append(temb.double().numpy())

    first.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _rule(forwards: list[tuple[int, str, np.ndarray]], *, coefficients, threshold: float, warmup: int,
          last: bool, steps: int) -> list[bool]:
    """TeaCache's rule written out with numpy, per branch (compute: True)."""
    acc, previous, out = {}, {}, []
    for step, context, m in forwards:
        prev = previous.get(context)
        if prev is None or step < warmup or (last and step == steps - 1):
            compute, acc[context] = True, 0.0
        else:
            acc[context] += np.polyval(coefficients, np.abs(m - prev).mean() / np.abs(prev).mean())
            compute = bool(acc[context] >= threshold)
            if compute:
                acc[context] = 0.0
        previous[context] = m
        out.append(compute)
    return out


CASES = {  # family: [(cache fields, warm-up and last step as published for it)]
    "wan": [(dict(coefficients=TINY_POLY, threshold=0.7, warmup_steps=1, compute_last=True), dict(warmup=1, last=True)),
            (dict(preset="wan2.1-t2v-1.3b", threshold=0.05), dict(warmup=5, last=False))],
    "hunyuanvideo": [(dict(preset="hunyuanvideo", threshold=0.1), dict(warmup=1, last=True))],
}


@pytest.fixture(scope="module")
def one_rank() -> dict:
    """Per family and case: the one-rank result, the cache's measured changes, the recorded
    indicators and how the applied cache says it decides."""
    out = {}
    for family, cases in CASES.items():
        engine = Engine.from_config(_run(family, CacheConfig()))
        seen = _record_indicators(engine, family)
        for index, (fields, _) in enumerate(cases):
            result = engine.render(_run(family, CacheConfig(kind="teacache", **fields)))
            applied = engine.caches["transformer"]
            out[family, index] = (result, list(applied.changes), list(seen), applied.decides)
            seen.clear()
    return out


@pytest.mark.parametrize("family, index", [(f, i) for f, cases in CASES.items() for i in range(len(cases))])
def test_decisions_are_the_rule_computed_by_hand(family, index, one_rank):
    fields, published = CASES[family][index]
    result, changes, seen, _ = one_rank[family, index]
    decisions = result.cache_decisions["transformer"]
    assert len(seen) == len(decisions) == 12  # 6 steps x 2 branches
    # The rule by hand with the coefficients the cache was given (test_presets_are_the_published_
    # coefficients checks the presets against their source).
    coefficients = fields.get("coefficients") or PRESETS[fields["preset"]].coefficients
    expected = _rule([(d[0], d[1], m) for d, m in zip(decisions, seen)], coefficients=coefficients,
                     threshold=fields["threshold"], steps=6, **published)
    assert [d[-1] for d in decisions] == expected
    assert True in expected and False in expected
    # Each measured change is the relative L1 of consecutive indicators of its branch.
    by_branch = {}
    for (step, context, *_), m in zip(decisions, seen):
        by_branch.setdefault(context, []).append((step, m))
    for step, context, change, _ in changes:
        (_, prev), (_, m) = [entry for entry in by_branch[context] if entry[0] in (step - 1, step)]
        assert change == pytest.approx(np.abs(m - prev).mean() / np.abs(prev).mean(), rel=1e-6)


# Each preset's row in the table of published TeaCache hyperparameters (published.py): the model
# and the mode whose indicator unison reads (Wan: use_ret_steps, the timestep projection e0).
SOURCE_ROWS = {"wan2.1-t2v-1.3b": ("Wan2.1 T2V 1.3B", "`use_ret_steps` (e0)"),
               "wan2.1-t2v-14b": ("Wan2.1 T2V 14B", "ret (e0)"),
               "wan2.1-i2v-14b-480p": ("Wan2.1 I2V 480P", "ret"),
               "wan2.1-i2v-14b-720p": ("Wan2.1 I2V 720P", "ret"),
               "hunyuanvideo": ("HunyuanVideo", "modulated img input")}


def test_presets_are_the_published_coefficients():
    """Every preset is its source's row: the coefficients as published, and the boundary steps its
    code uses (ret_steps counts cond and uncond calls, so 5*2 is 5 steps; a cutoff of steps*2
    leaves the last step to the rule, steps*2−2 or "first and last step compute" computes it)."""
    from published import teacache_table

    table = teacache_table()
    assert set(SOURCE_ROWS) == set(PRESETS)
    for name, row in SOURCE_ROWS.items():
        coefficients, boundary = table[row]
        preset = PRESETS[name]
        assert preset.coefficients == coefficients, name
        if boundary == "first and last step compute":
            assert (preset.warmup_steps, preset.compute_last) == (1, True), name
            continue
        calls = re.match(r"(?:ret=)?(\d+)\*2", boundary)
        assert calls and preset.warmup_steps == int(calls.group(1)), (name, boundary)
        if "steps*2" in boundary:  # the cutoff is stated
            assert preset.compute_last == ("steps*2−2" in boundary), (name, boundary)


def test_presets_are_fourth_degree_and_the_recipes_name_them():
    """Properties that hold whatever the source: TeaCache's published fits are 4th degree, finite;
    a preset computes its first step (no previous indicator); and the bundled recipes name a preset."""
    for name, preset in PRESETS.items():
        assert len(preset.coefficients) == 5 and all(math.isfinite(c) for c in preset.coefficients), name
        assert preset.warmup_steps >= 1 and preset.source, name
    recipes = sorted((ROOT / "configs").glob("*/teacache.yaml"))
    assert {p.parent.name for p in recipes} == {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "hunyuanvideo"}
    for path in recipes:
        cache = load_yaml(path).cache
        assert cache.kind == "teacache" and cache.preset in PRESETS, path


# ---------------------------------------------------------------------------------------------
# Data-dependent models under Ulysses 2: the agreed sums give the one-rank schedule.

AGREED = {"hunyuanvideo": CacheConfig(kind="teacache", preset="hunyuanvideo", threshold=0.1),
          # TI2V-5B's modulation is per token; the identity polynomial: changes of 0.35-0.44 a step
          # skip, compute, skip, compute, skip at 0.6.
          "wan2.2-ti2v": CacheConfig(kind="teacache", coefficients=(0, 0, 0, 1, 0), threshold=0.6, warmup_steps=1,
                                     compute_last=False)}


def _agreed_ranks(rank, world):
    out = {}
    for family, cache in AGREED.items():
        engine = Engine.from_config(_run(family, CacheConfig(), ParallelConfig(ulysses=2, timeout_s=60)),
                                    world_size=world)
        none = dict(engine.render().comm_calls)
        result = engine.render(dataclasses.replace(engine.plan.config, cache=cache))
        applied = engine.caches["transformer"]
        out[family] = (result.latents, result.cache_decisions, dict(result.comm_calls), none, applied.decides,
                       len(applied.changes))
    return out


def test_data_dependent_models_agree_on_sums_under_ulysses():
    expected = {}
    for family, cache in AGREED.items():
        engine = Engine.from_config(_run(family, cache))
        expected[family] = (engine.render(), engine.caches["transformer"].decides)
    for per_rank in run_ranks(2, _agreed_ranks):
        for family, (latents, decisions, calls, none, decides, measured) in per_rank.items():
            one, one_decides = expected[family]
            assert decides == one_decides == "data-dependent", family
            assert decisions == one.cache_decisions, family
            flags = [d[-1] for d in decisions["transformer"]]
            assert True in flags and False in flags, family
            assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5, family
            # One all-reduce per measured decision, nothing else added (skipped blocks skip theirs).
            assert measured > 0 and calls.get("all_reduce", 0) == none.get("all_reduce", 0) + measured, family
            assert calls["all_to_all"] < none["all_to_all"], family
            assert calls.get("all_gather", 0) <= none.get("all_gather", 0), family


def test_wan_decides_on_the_schedule_alone(one_rank):
    """Wan 2.1's indicator is the same tensor for both branches (it depends only on the timestep):
    the same change, hence the same decision, in cond and uncond; and the cache says schedule-only."""
    assert [one_rank[key][3] for key in sorted(one_rank)] == ["data-dependent", "schedule-only", "schedule-only"]
    changes = one_rank["wan", 0][1]
    cond = [c[2:] for c in changes if c[1] == "cond"]
    assert cond and cond == [c[2:] for c in changes if c[1] == "uncond"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before anything loads.

@pytest.mark.parametrize("cache, message", [
    ({"kind": "teacache"}, "cache.coefficients must be given: TeaCache needs this model's rescaling polynomial; "
                           "set cache.preset (one of wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b-480p, "
                           "wan2.1-i2v-14b-720p, hunyuanvideo) or cache.coefficients"),
    ({"kind": "teacache", "preset": "wan2.2-t2v-a14b"}, "cache.preset must be one of wan2.1-t2v-1.3b, "),
    ({"kind": "teacache", "preset": "hunyuanvideo", "threshold": float("nan")}, "cache.threshold must be a finite"),
    ({"kind": "teacache", "coefficients": [1.0, 2.0, 3.0]}, "cache.coefficients needs 5 values (a 4th-degree "
                                                            "polynomial, highest power first) or 6 (5th degree), got 3"),
    ({"kind": "teacache", "coefficients": [1, 2, 3, 4, float("inf")]}, "cache.coefficients must be a finite number"),
    ({"kind": "teacache", "preset": "hunyuanvideo", "coefficients": [1, 2, 3, 4, 5]}, "preset and coefficients both"),
    ({"kind": "teacache", "preset": "hunyuanvideo", "warmup_steps": -1}, "cache.warmup_steps must be at least 0"),
    ({"kind": "teacache", "preset": "hunyuanvideo", "max_consecutive_skips": 0},
     "cache.max_consecutive_skips must be at least 1"),
    ({"kind": "teacache", "preset": "hunyuanvideo", "mag_ratios": [1.0, 0.9]},
     "unknown config key 'cache.mag_ratios' for cache kind teacache; allowed in 'teacache': kind, verify, threshold"),
])
def test_bad_input_is_one_line_before_anything_loads(cache, message):
    refused_before_loading(cache, message)



# ---------------------------------------------------------------------------------------------
# Calibration (`unison calibrate --cache teacache`): the polynomial fitted on a render's pairs.

def _calibrate(rank, world, folder: str, out: str, extra: list[str]) -> dict[str, list[tuple]]:
    """The CLI's calibration run on this rank (the pool's group stands in for the launcher's); per
    expert, the (step, branch, x, y) pairs its fit was handed, recorded on their way into it."""
    from unison.caching import teacache
    from unison.launch import cache_calibration
    from unison.launch.cli import build_config, parser
    from unison.launch.dist import DistEnv

    args = parser().parse_args(["calibrate", "--model", folder, "--cache", "teacache", "--steps", "20", "--height",
                                "48", "--width", "64", "--frames", "9", "--seed", "1", "--negative-prompt", "blurred",
                                "--out", out, "--set", "output.progress=false", *extra])
    handed, fit = {}, teacache.fit

    def record(pairs, *, expert):
        handed[expert] = [tuple(pair) for pair in pairs]
        return fit(pairs, expert=expert)

    teacache.fit = record  # the kind's calibration fits through the module's `fit`
    try:
        assert cache_calibration.run(build_config(args), out, DistEnv(rank=rank, world_size=world)) == 0
    finally:
        teacache.fit = fit
    return handed


# How far two measurements of one pair may be apart. x and y are each R = Σ|a − b| / Σ|b|, float64
# sums over float32 tensors (b the branch's previous one). Two runs of the same forward (diffusers'
# pipeline and the engine; N ranks and one, whose reductions run in another order) give tensors
# apart by δ with Σ|δa| ≤ ε Σ|a| and Σ|δb| ≤ ε Σ|b|. As Σ|a| ≤ Σ|a − b| + Σ|b| = (1 + R) Σ|b|, the
# numerator moves by at most ε (2 + R) Σ|b| and the denominator by ε Σ|b|, so to first order
# |δR| ≤ ε (2 + R) + ε R = 2 ε (1 + R): no cancellation is amplified (unlike the coefficients of a
# degree-4 fit, whose Vandermonde matrix over HunyuanVideo's x in 0.03-0.12 has a condition number
# of 1e7: relative 1.6e-7 on the pairs moved its coefficients by 7e-7 here and 1.2e-6 on another
# machine). ε = 1e-6, sixteen float32 roundings (2^-24 each) of relative L1, is what the bound
# allows; measured |δR|: 0 for the engine against diffusers on one rank, under 2e-8 for Ulysses 2
# against one rank (HunyuanVideo; Wan's are equal).
# A ratio of one rank's tokens alone (sums not agreed) measures another part of the video: far more.
EPSILON = 1e-6


def _same_measurement(got: list[float], expected: list[float], what: str) -> None:
    assert len(got) == len(expected), what
    for index, (mine, theirs) in enumerate(zip(got, expected)):
        assert abs(mine - theirs) <= 2 * EPSILON * (1 + abs(theirs)), (what, index, mine, theirs)


def _assert_fit_of(coefficients: tuple[float, ...], pairs: list[tuple]) -> None:
    """`coefficients` (as the recipe writes them) are numpy.polyfit(x, y, 4) over `pairs`, compared
    where a fit is well-conditioned: its values at the measured x. The recipe rounds each
    coefficient to 10 significant digits (relative 5e-10), which moves poly(x) by at most
    5e-10 Σ|c_i| |x|^i. The same pairs into the same numpy give the same fit; were the solver's
    rounding to differ (another LAPACK), it would move the coefficients by ~1e-16 x cond(1e7) =
    1e-9 relative at most. 2e-9 Σ|c_i| |x|^i bounds both."""
    x = np.array([pair[2] for pair in pairs])
    expected = np.polyfit(x, np.array([pair[3] for pair in pairs]), 4)
    assert len(coefficients) == 5
    got, want = np.polyval(coefficients, x), np.polyval(expected, x)
    bound = 2e-9 * np.polyval(np.abs(expected), np.abs(x))
    assert (np.abs(got - want) <= bound).all(), (got - want, bound)


def _relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now - before).abs().sum(dtype=torch.float64) / before.abs().sum(dtype=torch.float64)).item()


def _pairs_by_hand(folder: str, sampling) -> dict[str, dict[tuple[int, str], tuple[float, float]]]:
    """diffusers' own WanPipeline (no cache) with plain hooks on each expert's first block (its
    timestep modulation input, TeaCache's Wan indicator) and last block (the stack's output): per
    expert, the (x, y) pairs of consecutive forwards of the same branch (cond and uncond alternate),
    by step of the run and branch."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, list[list[torch.Tensor]]] = {}
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name)
        if transformer is None:
            continue
        calls = seen.setdefault(name, [])
        transformer.blocks[0].register_forward_pre_hook(lambda module, args, calls=calls: calls.append([args[2]]))
        transformer.blocks[-1].register_forward_hook(lambda module, args, output, calls=calls:
                                                     calls[-1].append(output))
    pipe(prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=sampling.height,
         width=sampling.width, num_frames=sampling.frames, num_inference_steps=sampling.steps,
         guidance_scale=sampling.guidance, guidance_scale_2=sampling.guidance_2,
         max_sequence_length=sampling.max_sequence_length, generator=torch.Generator().manual_seed(sampling.seed),
         output_type="latent")
    firsts = {"transformer": 0, "transformer_2": len(seen.get("transformer", [])) // 2}  # two forwards a step
    return {name: _consecutive_pairs(calls, firsts[name]) for name, calls in seen.items()}


def _consecutive_pairs(calls: list, first_step: int = 0) -> dict[tuple[int, str], tuple[float, float]]:
    """(x, y) of consecutive forwards of each branch, by (step of the run, branch), from
    [indicator, output] per forward of a transformer whose first step is `first_step` (cond and
    uncond alternate, cond first)."""
    pairs = {}
    for branch, context in enumerate(("cond", "uncond")):
        forwards = calls[branch::2]
        for step, ((m0, o0), (m1, o1)) in enumerate(zip(forwards, forwards[1:]), start=first_step + 1):
            pairs[step, context] = (_relative_l1(m1, m0), _relative_l1(o1, o0))
    return pairs


def _matches_by_hand(handed: list[tuple], by_hand: dict[tuple[int, str], tuple[float, float]], what: str) -> None:
    """The pairs calibration measured are the ones computed by hand, branch and step alike."""
    assert sorted(by_hand) == sorted((step, context) for step, context, *_ in handed), what
    _same_measurement([v for pair in handed for v in pair[2:]],
                      [v for step, context, *_ in handed for v in by_hand[step, context]], what)


def _steps_of(handed: list[tuple]) -> list[int]:
    return sorted({step for step, *_ in handed})


def test_calibration_fits_numpy_polyfit_per_expert_and_n_ranks_fit_the_same(tiny_folder, tmp_path):
    """Tiny Wan 2.2 A14B, 20 steps: each expert's calibration measures the (x, y) pairs computed by
    hand from diffusers' pipeline for that expert (both branches, every step after its first); the
    recipe's cache (high-noise expert) and cache_2 (low-noise) hold numpy.polyfit(x, y, 4) over them;
    under Ulysses 2 every rank measures the same pairs; and the recipe renders."""
    folder = tiny_folder("wan2.2")
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    handed = _calibrate(0, 1, folder, str(one), [])
    recipe = load_yaml(one)
    by_hand = _pairs_by_hand(folder, recipe.sampling)
    assert sorted(handed) == sorted(by_hand) == ["transformer", "transformer_2"]
    high, low = _steps_of(handed["transformer"]), _steps_of(handed["transformer_2"])
    # The experts split the 20 steps; each gives a pair per branch from its own second step on.
    assert high[0] == 1 and low[-1] == 19 and low[0] - high[-1] == 2 and len(high) >= 5 and len(low) >= 5, (high, low)
    for cache, name in ((recipe.cache, "transformer"), (recipe.cache_2, "transformer_2")):
        _matches_by_hand(handed[name], by_hand[name], name)
        assert cache.kind == "teacache"
        _assert_fit_of(cache.coefficients, handed[name])
    assert recipe.cache.coefficients != pytest.approx(recipe.cache_2.coefficients, rel=1e-2)

    ranks = run_ranks(2, _calibrate, folder, str(two), ["--ulysses", "2"])
    assert ranks[0] == ranks[1]  # agreed sums: the ranks hold the same numbers
    other = load_yaml(two)
    assert other.parallel.ulysses == 2 and other.sampling == recipe.sampling
    for cache, name in ((other.cache, "transformer"), (other.cache_2, "transformer_2")):
        assert [p[:2] for p in ranks[0][name]] == [p[:2] for p in handed[name]]
        _same_measurement([v for p in ranks[0][name] for v in p[2:]], [v for p in handed[name] for v in p[2:]], name)
        _assert_fit_of(cache.coefficients, ranks[0][name])

    result = Engine.from_config(dataclasses.replace(recipe, output=OutputConfig(decode=False, progress=False))).render()
    assert set(result.cache_decisions) == {"transformer", "transformer_2"}


def _hunyuan_pairs_by_hand(folder: str, sampling) -> dict[tuple[int, str], tuple[float, float]]:
    """diffusers' own HunyuanVideoPipeline (no cache, true CFG) with plain hooks: TeaCache's
    indicator computed by hand before the first dual-stream block (its layer norm modulated by its
    own shift and scale) and the last block's output hidden states; the (x, y) pairs of
    consecutive forwards of each branch (cond and uncond alternate)."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    transformer, calls = pipe.transformer, []

    def indicator(module, args):
        hidden, temb = args[0], args[2]
        shift, scale = module.norm1.linear(torch.nn.functional.silu(temb)).chunk(6, dim=1)[:2]
        calls.append([module.norm1.norm(hidden) * (1 + scale[:, None]) + shift[:, None]])

    transformer.transformer_blocks[0].register_forward_pre_hook(indicator)
    transformer.single_transformer_blocks[-1].register_forward_hook(lambda m, a, output: calls[-1].append(output[0]))
    pipe(prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=sampling.height,
         width=sampling.width, num_frames=sampling.frames, num_inference_steps=sampling.steps,
         guidance_scale=sampling.guidance, true_cfg_scale=sampling.true_cfg_scale,
         max_sequence_length=sampling.max_sequence_length, generator=torch.Generator().manual_seed(sampling.seed),
         output_type="latent")
    return _consecutive_pairs(calls)


def test_calibration_agrees_a_split_indicator_over_ranks(tiny_folder, tmp_path):
    """HunyuanVideo: the indicator (the first block's modulated input) is split with the tokens
    under Ulysses, so x's sums are agreed over the ranks, as the decision's are, and y's too. One
    rank measures the pairs computed by hand from diffusers' pipeline and fits numpy.polyfit over
    them; under Ulysses 2 (each rank holding half the tokens) both ranks measure those pairs too
    (to the bound above: the coefficients themselves are ill-conditioned, see EPSILON)."""
    folder = tiny_folder("hunyuanvideo")
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    small = ["--steps", "8", "--height", "48", "--width", "48", "--set", "sampling.true_cfg_scale=3.0",
             "--set", "sampling.max_sequence_length=128"]
    handed = _calibrate(0, 1, folder, str(one), small)["transformer"]
    recipe = load_yaml(one)
    by_hand = _hunyuan_pairs_by_hand(folder, recipe.sampling)
    assert len(by_hand) == 14 and len({x for x, _ in by_hand.values()}) == 14 and recipe.cache_2 is None
    _matches_by_hand(handed, by_hand, "one rank")
    _assert_fit_of(recipe.cache.coefficients, handed)

    ranks = run_ranks(2, _calibrate, folder, str(two), [*small, "--ulysses", "2"])
    assert ranks[0] == ranks[1]  # agreed sums: the ranks hold the same numbers
    _matches_by_hand(ranks[0]["transformer"], by_hand, "Ulysses 2")
    _assert_fit_of(load_yaml(two).cache.coefficients, ranks[0]["transformer"])


@pytest.mark.parametrize("extra, message", [
    (["--cfg-parallel"], "calibrate runs under Ulysses and Ring only (a CFG half sees one branch"),
    (["--patch", "2"], "calibrate runs under Ulysses and Ring only"),
    (["--steps", "5"], "calibrate --cache teacache needs at least 6 steps (5 changes of the indicator for a "
                       "degree-4 fit), got 5"),
])
def test_calibration_bad_input_is_one_line_before_loading(tmp_path, capsys, extra, message):
    from unison.launch.cli import main

    assert main(["calibrate", "--cache", "teacache", "--out", str(tmp_path / "r.yaml"), "--steps", "8",
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r.yaml").exists()


# ---------------------------------------------------------------------------------------------
# The published coefficients, detected from a model folder's transformer config (no weights).

TEACACHE_DETECTED = [  # checkpoint (test_magcache.PUBLISHED_FOLDERS), the run's video, TeaCache's preset for it
    ("wan2.1-t2v-1.3b", dict(height=480, width=832), "wan2.1-t2v-1.3b"),
    ("wan2.1-t2v-14b", dict(height=720, width=1280), "wan2.1-t2v-14b"),
    ("wan2.1-i2v-14b", dict(height=480, width=832, image=True), "wan2.1-i2v-14b-480p"),
    ("wan2.1-i2v-14b", dict(height=720, width=1280, image=True), "wan2.1-i2v-14b-720p"),
    ("hunyuanvideo", dict(height=544, width=960), "hunyuanvideo"),
    ("hunyuanvideo", dict(height=720, width=1280), "hunyuanvideo"),
]


@pytest.mark.parametrize("name, video, preset", TEACACHE_DETECTED,
                         ids=[f"{d[0]}-{d[1]['height']}" for d in TEACACHE_DETECTED])
def test_plan_names_the_published_coefficients_of_the_folder(tmp_path, name, video, preset):
    """`cache: {kind: teacache}` alone on a folder of a checkpoint TeaCache's authors fitted: the
    resolved config names that preset (so the run reads its coefficients and boundary steps), and
    the plan says what was detected."""
    from test_magcache import picture, published_folder

    folder, video = published_folder(tmp_path, name), dict(video)
    if video.pop("image", False):
        video["image"] = picture(tmp_path)
    plan = plan_run(config_from_dict({"model": {"path": folder}, "cache": {"kind": "teacache", "threshold": 0.2},
                                      "sampling": video, "output": {"decode": False}}))
    assert plan.config.cache.preset == preset and plan.config.cache.threshold == 0.2
    assert plan.config.cache.resolved().coefficients == PRESETS[preset].coefficients
    note, = plan.notes
    assert note.startswith(f"cache.preset={preset} (TeaCache), detected: transformer/config.json has the shape of ")


@pytest.mark.parametrize("name", ["wan2.2-t2v-a14b", "wan2.2-ti2v-5b"])
def test_a_model_without_published_coefficients_keeps_the_error(tmp_path, name):
    """No TeaCache coefficients were published for Wan 2.2 (A14B: none; TI2V-5B: LightX2V's fit
    reads another tensor, see caching/teacache.py): today's error, saying so."""
    from test_magcache import published_folder

    with pytest.raises(UserError) as err:
        plan_run(config_from_dict({"model": {"path": published_folder(tmp_path, name)}, "cache": {"kind": "teacache"},
                                   "output": {"decode": False}}))
    message = str(err.value)
    assert message.startswith("cache.coefficients must be given: TeaCache needs this model's rescaling polynomial")
    assert message.endswith("; TeaCache has no published preset for " + ("Wan 2.2 T2V A14B (two experts)"
                            if name == "wan2.2-t2v-a14b" else "Wan 2.2 TI2V-5B (text or image to video)"))
    assert "\n" not in message
