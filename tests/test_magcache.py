"""MagCache: its decisions and latents against diffusers' own MagCache hook, the published presets
and their resampling to the run's step count, and its bad input. (The shared battery,
test_cache_battery.py, covers its lockstep under every layout and that it issues no collective
for its decisions under Ulysses 2.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import families
from test_cache_battery import refused_before_loading
from test_parallel_engine import _config
from unison.caching.magcache import MagCacheConfig, resample, retention_step
from unison.caching.magcache_presets import PRESETS
from unison.engine.plan import plan_run
from unison.engine.config import (CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig,
                                  config_from_dict, load_yaml)
from unison.engine.render import Engine
from unison.engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# 11 ratios for a 5-step run: resampled at 0, 2.5, 5, 7.5, 10, whose halves round to even (2, 8).
RATIOS = (1.0, 0.99, 0.93, 0.995, 0.97, 0.985, 0.96, 0.97, 0.99, 0.98, 0.9)
UNCOND = (1.0, 0.995, 0.98, 0.99, 0.9, 0.99, 0.97, 0.99, 0.95, 0.98, 0.93)


def test_resampling_is_diffusers_nearest_interp():
    from diffusers.hooks.mag_cache import nearest_interp

    for ratios in (RATIOS, PRESETS["wan2.1-t2v-1.3b"].branches()[1], PRESETS["hunyuanvideo-720p"].values):
        for steps in (1, 2, 3, 4, 5, 7, 10, 11, 28, 30, 49, 50, 51, 100):
            theirs = nearest_interp(torch.tensor(ratios), steps).tolist()
            assert resample(ratios, steps) == pytest.approx(theirs, rel=1e-7, abs=0), (len(ratios), steps)
    assert resample(RATIOS, 5) == (1.0, 0.93, 0.985, 0.99, 0.9)  # ties to even: 2.5 -> 2, 7.5 -> 8
    assert resample(RATIOS, 11) == RATIOS
    # Retention rounds halves up, in steps of one branch: 0.2 x 5 = 1; 0.25 x 10 = 2.5 -> 3; 0.2 x 28 = 5.6 -> 6.
    assert [retention_step(0.2, 5), retention_step(0.25, 10), retention_step(0.2, 28), retention_step(0.1, 4)] \
        == [1, 3, 6, 0]


# Each preset's array in the published ratios (published.py, Appendix A of the team's copy).
SOURCE_ARRAYS = {"wan2.1-t2v-14b": "Wan2.1-T2V-14B", "wan2.1-t2v-1.3b": "Wan2.1-T2V-1.3B",
                 "wan2.1-i2v-14b-480p": "Wan2.1-I2V-14B-480P", "wan2.1-i2v-14b-720p": "Wan2.1-I2V-14B-720P",
                 "hunyuanvideo-720p": "HunyuanVideo 720p", "hunyuanvideo-544p": "HunyuanVideo 544p/540p",
                 "wan2.2-t2v-a14b": "Wan2.2-T2V-A14B", "wan2.2-ti2v-5b": "Wan2.2-TI2V-5B t2v",
                 "wan2.2-ti2v-5b-i2v": "Wan2.2-TI2V-5B i2v", "wan2.2-i2v-a14b": "Wan2.2-I2V-A14B"}


def test_presets_are_the_published_ratios():
    """Every preset holds its source's array as the authors' code reads it (their prepended 1.0s,
    then the published values), and splits Wan's interleaved calls into branches: even calls cond,
    odd uncond; HunyuanVideo's one branch serves both."""
    from published import magcache_arrays

    arrays = magcache_arrays()
    assert set(SOURCE_ARRAYS) == set(PRESETS)
    for name, heading in SOURCE_ARRAYS.items():
        published = arrays[heading]
        assert PRESETS[name].values == published, name
        cond, uncond = PRESETS[name].branches()
        if name.startswith("hunyuanvideo"):
            assert cond == uncond == published, name
        else:
            assert cond == published[0::2] and uncond == published[1::2], name


def test_presets_have_a_ratio_per_published_step_and_resample_to_the_run():
    """Properties whatever the source: one ratio per step and branch at the step count each was
    calibrated at (50; Wan 2.1 I2V and Wan 2.2 A14B 40), the first 1.0 (no residual before it), each
    a magnitude ratio near 1 (0.5-1.5); at any step count the resampled table keeps the first and
    last ratios and is diffusers' own nearest_interp."""
    from diffusers.hooks.mag_cache import nearest_interp

    steps = {"wan2.1-i2v-14b-480p": 40, "wan2.1-i2v-14b-720p": 40, "wan2.2-t2v-a14b": 40, "wan2.2-i2v-a14b": 40}
    for name, published in PRESETS.items():
        cond, uncond = published.branches()
        assert len(cond) == len(uncond) == steps.get(name, 50), name
        assert cond[0] == uncond[0] == 1.0 and all(0.5 < r < 1.5 for r in cond + uncond), name
    config = MagCacheConfig(preset="wan2.1-t2v-1.3b")
    for context, ratios in config.branch_ratios().items():
        for run in (2, 7, 30, 100):
            resampled = resample(ratios, run)
            assert len(resampled) == run and (resampled[0], resampled[-1]) == (ratios[0], ratios[-1]), (context, run)
            assert resampled == pytest.approx(nearest_interp(torch.tensor(ratios), run).tolist(), rel=1e-7, abs=0)
    assert config.branch_ratios()["uncond"] == PRESETS["wan2.1-t2v-1.3b"].branches()[1]


def test_bundled_recipes_name_a_preset():
    recipes = sorted((ROOT / "configs").glob("*/magcache.yaml"))
    assert {p.parent.name for p in recipes} >= {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b",
                                                 "wan2.2-ti2v-5b", "hunyuanvideo"}
    for path in recipes:
        cache = load_yaml(path).cache
        assert cache.kind == "magcache" and cache.preset in PRESETS, path


@pytest.mark.parametrize("cache, message", [
    ({"kind": "magcache"}, "cache.mag_ratios must be given: MagCache needs this model's per-step magnitude ratios"),
    ({"kind": "magcache", "mag_ratios": [0.9]}, "cache.mag_ratios needs at least 2 values"),
    ({"kind": "magcache", "mag_ratios": []}, "cache.mag_ratios needs at least 2 values"),
    ({"kind": "magcache", "mag_ratios": [1.0, 0.0]}, "cache.mag_ratios must be positive"),
    ({"kind": "magcache", "mag_ratios": [1.0, float("nan")]}, "cache.mag_ratios must be a finite number"),
    ({"kind": "magcache", "preset": "wan9"}, "cache.preset must be one of wan2.1-t2v-14b, "),
    ({"kind": "magcache", "preset": "hunyuanvideo-720p", "mag_ratios": [1, 1]}, "preset and mag_ratios both"),
    ({"kind": "magcache", "preset": "hunyuanvideo-720p", "retention_ratio": 1.5}, "cache.retention_ratio must be"),
    ({"kind": "magcache", "preset": "hunyuanvideo-720p", "max_skip_steps": -1}, "cache.max_skip_steps must be"),
    ({"kind": "magcache", "preset": "hunyuanvideo-720p", "joint_cfg": True},
     "unknown config key 'cache.joint_cfg' for cache kind magcache; allowed in 'magcache': kind, verify, threshold"),
])
def test_bad_input_is_one_line_before_anything_loads(cache, message):
    refused_before_loading(cache, message)



# ---------------------------------------------------------------------------------------------
# One rank: the decisions and latents of diffusers' MagCacheConfig hook, same ratios, same model.

PARITY = {"wan": dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2),
          "wan2.2": dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2),
          "wan2.2-ti2v": dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2),
          "wan-i2v": dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2),
          "wan2.2-i2v": dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2),
          "hunyuanvideo": dict(threshold=0.05, max_skip_steps=1, retention_ratio=0.2)}


def _diffusers_decisions(hooked: list[tuple[torch.nn.Module, object]], monkeypatch) -> list[bool]:
    """Apply diffusers' MagCache to each (transformer, its config); the returned list fills with
    the head hooks' decisions at every forward, in call order (Wan 2.2's experts never overlap)."""
    from diffusers.hooks.mag_cache import MagCacheHeadHook, apply_mag_cache

    decisions: list[bool] = []
    decide = MagCacheHeadHook.new_forward

    def record(hook, module, *args, **kwargs):
        output = decide(hook, module, *args, **kwargs)
        decisions.append(hook.state_manager.get_state().should_compute)
        return output

    monkeypatch.setattr(MagCacheHeadHook, "new_forward", record)
    for transformer, config in hooked:
        apply_mag_cache(transformer, config)
    return decisions


def _switch_step(pipe, steps: int) -> int:
    """The first step of Wan 2.2 A14B's low-noise expert, as diffusers' pipeline picks it: the
    first timestep below boundary_ratio x num_train_timesteps."""
    pipe.scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return int((pipe.scheduler.timesteps >= boundary).sum())


@pytest.mark.parametrize("family", ["wan", "wan2.2", "wan2.2-ti2v", "wan-i2v", "wan2.2-i2v", "hunyuanvideo"])
def test_magcache_decides_like_diffusers(tiny_folder, family, monkeypatch, tmp_path):
    """diffusers' MagCacheConfig takes one table for every cache context, so both branches read
    RATIOS here. On Wan 2.2 A14B diffusers' hook goes on each expert, with a state (step counter,
    accumulators, residual) per expert that counts that expert's own forwards from 0 and a
    retention window of int(R x num_inference_steps + 0.5) of them; unison's low-noise expert
    instead reads the run's table at the loop's step index and counts the retention window over
    the whole run (caching/magcache.py). So that both are handed the same ratios, the low-noise
    expert's diffusers hook gets the run's table from the switch step on (diffusers' own
    resampling to the run's steps, sliced), num_inference_steps = its own steps, and the
    retention ratio whose window ends where the run's does (0 once the switch is past it). The
    high-noise expert's hook is diffusers' as is (the run's table and steps; its counter is the
    loop's step). Given the run's whole table and steps instead, the low-noise expert's hook reads
    the table at its own count (step 4 of this 8-step run reads step 1's ratio) and computes at
    step 4, where unison skips."""
    from diffusers.hooks import MagCacheConfig as DiffusersConfig
    from diffusers.hooks.mag_cache import nearest_interp

    folder, steps = tiny_folder(family), 5 if family in ("wan", "wan-i2v", "hunyuanvideo") else 8
    sampling = families.sampling(family, steps=steps, folder=tmp_path)
    settings = PARITY[family]
    ours = Engine.from_config(RunConfig(
        model=ModelConfig(path=folder), sampling=sampling, output=OutputConfig(decode=False, progress=False),
        cache=CacheConfig(kind="magcache", mag_ratios=RATIOS, **settings))).render()

    pipe = families.pipeline(family, folder)
    hooked = [(pipe.transformer, DiffusersConfig(mag_ratios=list(RATIOS), num_inference_steps=steps, **settings))]
    if getattr(pipe, "transformer_2", None) is not None:
        switch = _switch_step(pipe, steps)
        assert 0 < switch < steps - 2, switch  # both experts run, the low-noise one long enough to skip
        own = steps - switch
        window = max(0, int(settings["retention_ratio"] * steps + 0.5) - switch)
        retention = window / own
        assert int(retention * own + 0.5) == window
        table = nearest_interp(torch.tensor(RATIOS), steps)[switch:]
        hooked.append((pipe.transformer_2, DiffusersConfig(
            mag_ratios=table, num_inference_steps=own, threshold=settings["threshold"],
            max_skip_steps=settings["max_skip_steps"], retention_ratio=retention)))
    theirs = _diffusers_decisions(hooked, monkeypatch)
    latents = families.run(pipe, family, sampling)

    mine = [d[-1] for d in sorted((d for e in ours.cache_decisions.values() for d in e),
                                  key=lambda d: (d[0], d[1] != "cond"))]
    assert True in theirs and False in theirs, theirs
    assert mine == theirs
    if family in ("wan2.2", "wan2.2-i2v"):  # the low-noise expert skips too: the slice is what was compared
        low = [d[-1] for d in ours.cache_decisions["transformer_2"]]
        assert True in low and False in low, low
    assert ((ours.latents - latents).norm() / latents.norm()).item() <= 1e-5


def _rule(ratios: tuple[float, ...], run: range, *, steps: int, threshold: float, max_skip_steps: int,
          retention_ratio: float) -> list[bool]:
    """MagCache's rule written out for one branch of a cache that runs the steps `run` (compute: True)."""
    ratio, count, error, cached, out = 1.0, 0, 0.0, False, []
    for step in run:
        compute = True
        if step >= int(retention_ratio * steps + 0.5):
            ratio, count = ratio * ratios[step], count + 1
            error += abs(1 - ratio)
            compute = not (cached and error <= threshold and count <= max_skip_steps)
            if compute:
                ratio, count, error = 1.0, 0, 0.0
        cached = True
        out.append(compute)
    return out


def test_wan22_experts_each_read_the_run_table_at_their_steps():
    """Tiny Wan 2.2 A14B, 8 steps: the high-noise expert runs steps 0-2, the low-noise one 3-7.
    Each expert's cache has its own accumulators and residual (so the low-noise expert's first step
    computes) and reads the run's ratios at the global step; the retention window counts the run."""
    ratios, settings = (1.0, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.96), dict(threshold=0.05, max_skip_steps=2,
                                                                               retention_ratio=0.25)
    config = RunConfig(model=ModelConfig(family="wan2.2"), output=OutputConfig(decode=False, progress=False),
                       sampling=SamplingConfig(steps=8, height=48, width=64, frames=9, negative_prompt="blurred"),
                       cache=CacheConfig(kind="magcache", mag_ratios=ratios, **settings))
    result = Engine.from_config(config).render()
    assert [s.expert for s in result.loop.steps] == ["transformer"] * 3 + ["transformer_2"] * 5
    for expert, run in (("transformer", range(0, 3)), ("transformer_2", range(3, 8))):
        expected = _rule(ratios, run, steps=8, **settings)
        for context in ("cond", "uncond"):
            decisions = [d for d in result.cache_decisions[expert] if d[1] == context]
            assert [d[0] for d in decisions] == list(run)
            assert [d[-1] for d in decisions] == expected, (expert, context)
    assert _rule(ratios, range(3, 8), steps=8, **settings) == [True, False, False, True, False]


def test_wan22_experts_take_their_own_cache_configs():
    """cache_2 is the low-noise expert's. Tiny Wan 2.2 A14B, 8 steps (high noise 0-2, low noise 3-7):
    with MagCache at K 1 for the high-noise expert and K 2 for the low-noise one, each expert's
    decisions are the rule at its own K (and at the other K they would differ); with DBCache for
    the low-noise expert instead (a threshold every change is below, 2 warm-up steps counted in
    that expert's own steps, at most 2 cached steps per branch), its forwards compute, compute,
    skip, skip, compute."""
    ratios = (1.0, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.96)
    high, low = (dict(threshold=0.05, max_skip_steps=k, retention_ratio=0.0) for k in (1, 2))
    base = RunConfig(model=ModelConfig(family="wan2.2"), output=OutputConfig(decode=False, progress=False),
                     sampling=SamplingConfig(steps=8, height=48, width=64, frames=9, negative_prompt="blurred"),
                     cache=CacheConfig(kind="magcache", mag_ratios=ratios, **high),
                     cache_2=CacheConfig(kind="magcache", mag_ratios=ratios, **low))
    engine = Engine.from_config(base)
    result = engine.render()
    assert [s.expert for s in result.loop.steps] == ["transformer"] * 3 + ["transformer_2"] * 5
    expected = {"transformer": _rule(ratios, range(0, 3), steps=8, **high),
                "transformer_2": _rule(ratios, range(3, 8), steps=8, **low)}
    assert expected == {"transformer": [True, False, True], "transformer_2": [True, False, False, True, False]}
    assert _rule(ratios, range(3, 8), steps=8, **high) != expected["transformer_2"]
    for expert, run in (("transformer", range(0, 3)), ("transformer_2", range(3, 8))):
        for context in ("cond", "uncond"):
            decisions = [d for d in result.cache_decisions[expert] if d[1] == context]
            assert [d[0] for d in decisions] == list(run)
            assert [d[-1] for d in decisions] == expected[expert], (expert, context)

    db = CacheConfig(kind="dbcache", threshold=1e6, warmup_steps=2, max_cached_steps=2)
    result = engine.render(dataclasses.replace(base, cache_2=db))
    assert {name: cache.name for name, cache in engine.caches.items()} == {"transformer": "magcache",
                                                                           "transformer_2": "dbcache"}
    for context in ("cond", "uncond"):
        assert [d[-1] for d in result.cache_decisions["transformer"] if d[1] == context] == expected["transformer"]
        assert [d[-1] for d in result.cache_decisions["transformer_2"] if d[1] == context] \
            == [True, True, False, False, True]


def test_a_preset_gives_each_branch_its_own_ratios_resampled_to_the_run():
    """Wan 2.1 1.3B's published table (50 steps) on a 6-step tiny Wan run: each branch follows
    the rule on its own ratios, resampled from 50 to 6."""
    settings = dict(threshold=0.12, max_skip_steps=2, retention_ratio=0.2)
    cache = CacheConfig(kind="magcache", preset="wan2.1-t2v-1.3b", **settings)
    config = dataclasses.replace(_config("wan", 48, ParallelConfig()), cache=cache)
    config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, steps=6))
    result = Engine.from_config(config).render()
    for context, ratios in zip(("cond", "uncond"), PRESETS["wan2.1-t2v-1.3b"].branches()):
        expected = _rule(resample(ratios, 6), range(6), steps=6, **settings)
        assert [d[-1] for d in result.cache_decisions["transformer"] if d[1] == context] == expected, context
        assert True in expected and False in expected


# ---------------------------------------------------------------------------------------------
# Calibration (`unison calibrate --cache magcache`).

def _calibrate(rank, world, folder: str, out: str, extra: list[str]):
    """The CLI's calibration run on this rank (the pool's group stands in for the launcher's)."""
    from unison.launch.cache_calibration import run
    from unison.launch.cli import build_config, parser
    from unison.launch.dist import DistEnv

    args = parser().parse_args(["calibrate", "--model", folder, "--cache", "magcache", "--steps", "5", "--height", "48",
                                "--width", "64", "--frames", "9", "--seed", "1", "--out", out,
                                "--set", "output.progress=false", *extra])
    return run(build_config(args), out, DistEnv(rank=rank, world_size=world))


def test_calibration_measures_what_diffusers_measures_and_n_ranks_write_the_same_file(tiny_folder, tmp_path,
                                                                                      monkeypatch):
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig as DiffusersConfig
    from diffusers.hooks.mag_cache import MagCacheBlockHook, apply_mag_cache

    from multirank import run_ranks
    from unison.engine.config import load_yaml

    folder = tiny_folder("wan")
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    assert _calibrate(0, 1, folder, str(one), []) == 0
    ours = load_yaml(one).cache
    assert len(ours.mag_ratios) == 5 and ours.mag_ratios[0] == 1.0 and ours.mag_ratios_uncond is not None

    # diffusers' calibration mode on the same model and run: one list per cache context.
    measured: dict[int, list[float]] = {}
    step = MagCacheBlockHook._perform_calibration_step

    def record(hook, state, residual):
        step(hook, state, residual)
        measured.setdefault(id(state), []).append(state.calibration_ratios[-1])

    monkeypatch.setattr(MagCacheBlockHook, "_perform_calibration_step", record)
    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    apply_mag_cache(pipe.transformer, DiffusersConfig(calibrate=True, num_inference_steps=5))
    sampling = load_yaml(one).sampling
    pipe(prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=48, width=64, num_frames=9,
         num_inference_steps=5, guidance_scale=sampling.guidance, max_sequence_length=sampling.max_sequence_length,
         generator=torch.Generator().manual_seed(1), output_type="latent")
    cond, uncond = measured.values()  # contexts in the order they first ran: cond, then uncond
    assert ours.mag_ratios == pytest.approx(cond, rel=1e-6) and ours.mag_ratios_uncond == pytest.approx(uncond, rel=1e-6)

    # Ulysses 2: the sums of both shards make the same ratios, so the same file.
    run_ranks(2, _calibrate, folder, str(two), ["--ulysses", "2"])
    assert two.read_text().replace("ulysses: 2", "ulysses: 1") == one.read_text()
    # The recipe renders (the ratios resampled to its steps) and MagCache skips with it.
    result = Engine.from_config(dataclasses.replace(load_yaml(one), output=OutputConfig(decode=False, progress=False),
                                                    cache=dataclasses.replace(ours, threshold=0.5))).render()
    assert False in [d[-1] for d in result.cache_decisions["transformer"]]


def _diffusers_block_stack(folder: str, sampling) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """diffusers' own WanPipeline (no cache) on `folder`, with plain hooks on each expert's first
    and last block: (expert, first block's input, last block's output) per forward, in call order."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name)
        if transformer is None:
            continue
        inputs: list[torch.Tensor] = []
        transformer.blocks[0].register_forward_pre_hook(lambda module, args, inputs=inputs: inputs.append(args[0]))
        transformer.blocks[-1].register_forward_hook(
            lambda module, args, output, name=name, inputs=inputs: seen.append((name, inputs.pop(), output)))
    pipe(prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=sampling.height,
         width=sampling.width, num_frames=sampling.frames, num_inference_steps=sampling.steps,
         guidance_scale=sampling.guidance, guidance_scale_2=sampling.guidance_2,
         max_sequence_length=sampling.max_sequence_length, generator=torch.Generator().manual_seed(sampling.seed),
         output_type="latent")
    return seen


def test_wan22_calibration_writes_one_run_table_measured_across_the_switch(tiny_folder, tmp_path):
    """Tiny Wan 2.2 A14B, 8 steps: each expert's MagCache measures at the steps it runs, and the
    recipe holds one table for the run (what rendering reads at the loop's step index). A hand
    computation from diffusers' own pipeline with plain hooks: per branch (cond, uncond alternate),
    one chain of block-stack residuals over the whole run, the mean over tokens of |r_t| / |r_t−1|,
    so the low-noise expert's first ratio is its residual over the high-noise expert's last, as the
    authors' A14B tables record it. Ulysses 2 writes the same file."""
    from multirank import run_ranks

    folder = tiny_folder("wan2.2")
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    assert _calibrate(0, 1, folder, str(one), ["--steps", "8"]) == 0
    recipe = load_yaml(one)
    seen = _diffusers_block_stack(folder, recipe.sampling)
    experts = [name for name, *_ in seen[0::2]]
    switch = experts.index("transformer_2")
    assert 0 < switch < 7 and experts == ["transformer"] * switch + ["transformer_2"] * (8 - switch)
    for branch, ratios in ((0, recipe.cache.mag_ratios), (1, recipe.cache.mag_ratios_uncond)):
        residuals = [output - first for _, first, output in seen[branch::2]]
        expected = [1.0] + [(r.norm(dim=-1) / (p.norm(dim=-1) + 1e-8)).mean().item()
                            for p, r in zip(residuals, residuals[1:])]
        assert ratios == pytest.approx(expected, rel=1e-6), branch
        assert abs(ratios[switch] - 1.0) > 1e-3  # measured across the switch, not restarted at 1.0
    assert recipe.cache_2 is None and recipe.model.family == "wan2.2"

    run_ranks(2, _calibrate, folder, str(two), ["--ulysses", "2", "--steps", "8"])
    assert two.read_text().replace("ulysses: 2", "ulysses: 1") == one.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--cache", "fbcache"], "calibrate: --cache magcache or --cache teacache can be calibrated, got 'fbcache'"),
    (["--cache", "magcache", "--cfg-parallel"], "calibrate runs under Ulysses and Ring only"),
    (["--cache", "magcache", "--patch", "2"], "calibrate runs under Ulysses and Ring only"),
])
def test_calibration_bad_input_is_one_line(tmp_path, capsys, extra, message):
    from unison.launch.cli import main

    assert main(["calibrate", "--out", str(tmp_path / "r.yaml"), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r.yaml").exists()


# ---------------------------------------------------------------------------------------------
# The published preset, detected from a model folder's transformer config (no weights).

# Each checkpoint's transformer as diffusers' conversion scripts build it (scripts/convert_wan_to_diffusers.py
# get_transformer_config, scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS); the class
# writes config.json with the rest of its defaults, as save_pretrained does.
_WAN_14B = dict(num_layers=40, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824)
PUBLISHED_FOLDERS = {  # name: (pipeline class, transformer keyword arguments, other model_index.json entries)
    "wan2.1-t2v-1.3b": ("WanPipeline", dict(num_layers=30, num_attention_heads=12, in_channels=16, out_channels=16,
                                            ffn_dim=8960), {}),
    "wan2.1-t2v-14b": ("WanPipeline", _WAN_14B, {}),
    "wan2.1-i2v-14b": ("WanImageToVideoPipeline", dict(_WAN_14B, in_channels=36, image_dim=1280,
                                                       added_kv_proj_dim=5120), {}),
    "wan2.1-flf2v-14b": ("WanImageToVideoPipeline", dict(_WAN_14B, in_channels=36, image_dim=1280,
                                                         added_kv_proj_dim=5120, pos_embed_seq_len=514), {}),
    "wan2.2-t2v-a14b": ("WanPipeline", _WAN_14B, {"boundary_ratio": 0.875}),
    "wan2.2-i2v-a14b": ("WanImageToVideoPipeline", dict(_WAN_14B, in_channels=36), {"boundary_ratio": 0.9}),
    "wan2.2-ti2v-5b": ("WanPipeline", dict(num_layers=30, num_attention_heads=24, in_channels=48, out_channels=48,
                                           ffn_dim=14336), {"expand_timesteps": True}),
    "hunyuanvideo": ("HunyuanVideoPipeline", dict(in_channels=16, num_attention_heads=24, attention_head_dim=128,
                                                  num_layers=20, num_single_layers=40), {}),
}


def published_folder(root: Path, name: str, **changes) -> str:
    """A weightless diffusers folder of the checkpoint `name`: model_index.json and each expert's
    transformer config.json (its shape with `changes`)."""
    import json

    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    pipeline, shape, extra = PUBLISHED_FOLDERS[name]
    cls = HunyuanVideoTransformer3DModel if pipeline.startswith("Hunyuan") else WanTransformer3DModel
    folder = root / f"{name}-{len(list(root.iterdir()))}"
    experts = ["transformer", "transformer_2"] if "boundary_ratio" in extra else ["transformer"]
    with torch.device("meta"):  # the config only: no memory for 14B parameters
        transformer = cls(**{**shape, **changes})
    for expert in experts:
        transformer.save_config(folder / expert)
    index = {"_class_name": pipeline, **{e: ["diffusers", cls.__name__] for e in experts},
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"], **extra}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def picture(root: Path) -> str:
    from PIL import Image

    path = root / "first.png"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(path)
    return str(path)


def _plan(folder: str, cache: dict, **sampling):
    return plan_run(config_from_dict({"model": {"path": folder}, "cache": cache, "sampling": sampling,
                                      "output": {"decode": False}}))


DETECTED = [  # checkpoint, the run's video, the preset its authors published for it
    ("wan2.1-t2v-1.3b", dict(height=480, width=832), "wan2.1-t2v-1.3b", "Wan 2.1 T2V 1.3B"),
    ("wan2.1-t2v-14b", dict(height=720, width=1280), "wan2.1-t2v-14b", "Wan 2.1 T2V 14B"),
    ("wan2.1-i2v-14b", dict(height=480, width=832, image=True), "wan2.1-i2v-14b-480p", "Wan 2.1 I2V 14B"),
    ("wan2.1-i2v-14b", dict(height=832, width=480, image=True), "wan2.1-i2v-14b-480p", "Wan 2.1 I2V 14B"),
    ("wan2.1-i2v-14b", dict(height=720, width=1280, image=True), "wan2.1-i2v-14b-720p", "Wan 2.1 I2V 14B"),
    ("wan2.2-t2v-a14b", dict(height=720, width=1280), "wan2.2-t2v-a14b", "Wan 2.2 T2V A14B"),
    ("wan2.2-i2v-a14b", dict(height=720, width=1280, image=True), "wan2.2-i2v-a14b", "Wan 2.2 I2V A14B"),
    ("wan2.2-ti2v-5b", dict(height=704, width=1280), "wan2.2-ti2v-5b", "Wan 2.2 TI2V 5B"),
    ("wan2.2-ti2v-5b", dict(height=704, width=1280, image=True), "wan2.2-ti2v-5b-i2v", "Wan 2.2 TI2V 5B"),
    ("hunyuanvideo", dict(height=544, width=960), "hunyuanvideo-544p", "HunyuanVideo T2V"),
    ("hunyuanvideo", dict(height=720, width=1280), "hunyuanvideo-720p", "HunyuanVideo T2V"),
]


@pytest.mark.parametrize("name, video, preset, title", DETECTED,
                         ids=[f"{d[0]}-{d[1]['height']}x{d[1]['width']}{'-image' if 'image' in d[1] else ''}"
                              for d in DETECTED])
def test_plan_names_the_published_preset_of_the_folder(tmp_path, name, video, preset, title):
    """`cache: {kind: magcache}` alone on a folder of a published checkpoint: the resolved config
    names the preset MagCache's authors published for it (and for the video's resolution, or
    image), the plan says what was detected from what, and it is the config (so the checkpoint
    fingerprint) that naming the preset gives."""
    from unison.engine.io.checkpoint import fingerprint
    from unison.engine.config import dump_yaml

    folder, video = published_folder(tmp_path, name), dict(video)
    if video.pop("image", False):
        video["image"] = picture(tmp_path)
    plan = _plan(folder, {"kind": "magcache"}, **video)
    assert plan.config.cache.preset == preset and plan.config.cache.mag_ratios is None
    assert f"preset: {preset}" in dump_yaml(plan.config)
    note, = plan.notes
    assert note.startswith(f"cache.preset={preset} (MagCache), detected: transformer/config.json")
    assert f"the shape of {title} (" in note and "\n" not in note
    assert f"cache      {note}" in plan.describe()
    named = _plan(folder, {"kind": "magcache", "preset": preset}, **video)
    assert named.notes == () and named.config == plan.config
    assert fingerprint(plan.config, world_size=1) == fingerprint(named.config, world_size=1)
    if plan.spec.two_experts:  # the low-noise expert's cache_2, given without ratios, reads the same table
        both = plan_run(config_from_dict({"model": {"path": folder}, "cache": {"kind": "magcache"},
                                          "cache_2": {"max_skip_steps": 3}, "sampling": video,
                                          "output": {"decode": False}}))
        assert both.config.cache.preset == both.config.cache_2.preset == preset
        assert both.config.cache_2.max_skip_steps == 3 and len(both.notes) == 2


def test_every_published_shape_names_existing_presets():
    """Every kind with presets in the registry has each preset named by a published shape, and a
    published shape names presets of such kinds only (engine/cache_presets.py finds them there)."""
    from unison.caching import registry
    from unison.engine.models import checkpoints

    presets = {name: kind.presets for name, kind in registry.KINDS.items() if kind.presets is not None}
    assert {kind for _, model in checkpoints().values() for kind in model.presets} <= set(presets)
    assert presets["magcache"] is PRESETS
    for kind, table in presets.items():  # every published table has its model's shape
        assert {pick.preset for _, model in checkpoints().values() for pick in model.presets.get(kind, ())} == set(table), kind


@pytest.mark.parametrize("name, changes, looked", [
    ("wan2.1-t2v-1.3b", dict(num_layers=31),
     "looked for Wan 2.1 T2V 1.3B: num_layers 30, num_attention_heads 12, in_channels 16, ffn_dim 8960; "
     "Wan 2.1 T2V 14B: num_layers 40, num_attention_heads 40, in_channels 16, ffn_dim 13824)"),
    ("wan2.1-flf2v-14b", {}, "looked for Wan 2.1 I2V 14B: num_layers 40, num_attention_heads 40, in_channels 36, "
                             "ffn_dim 13824, image_dim 1280, pos_embed_seq_len null)"),
    ("hunyuanvideo", dict(image_condition_type="token_replace"), "looked for HunyuanVideo T2V: num_layers 20, "
     "num_single_layers 40, num_attention_heads 24, attention_head_dim 128, in_channels 16, image_condition_type null)"),
])
def test_an_unknown_shape_keeps_the_error_and_names_the_shapes_looked_for(tmp_path, name, changes, looked):
    folder = published_folder(tmp_path, name, **changes)
    sampling = dict(image=picture(tmp_path)) if name == "wan2.1-flf2v-14b" else {}
    with pytest.raises(UserError) as err:
        _plan(folder, {"kind": "magcache"}, **sampling)
    message = str(err.value)
    assert message.startswith("cache.mag_ratios must be given: MagCache needs this model's per-step magnitude ratios; "
                              "set cache.preset (one of wan2.1-t2v-14b, ")
    assert f"; no published model matched {folder}/transformer/config.json ({looked}" in message
    assert message.endswith(looked) and "\n" not in message


def test_given_ratios_or_calibration_detect_nothing(tmp_path):
    folder = published_folder(tmp_path, "wan2.1-t2v-1.3b")
    given = _plan(folder, {"kind": "magcache", "mag_ratios": list(RATIOS)}, height=480, width=832)
    calibrating = _plan(folder, {"kind": "magcache", "calibrate": True}, height=480, width=832)
    for plan in (given, calibrating):
        assert plan.config.cache.preset is None and plan.notes == ()


def test_dry_run_prints_the_detected_preset(tmp_path, capsys, monkeypatch):
    import unison.engine.load as build
    from unison.launch.cli import main

    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("dry run loaded weights"))
    folder = published_folder(tmp_path, "wan2.1-t2v-1.3b")
    assert main(["generate", "--model", folder, "--dry-run", "--cache", "magcache", "--height", "480",
                 "--width", "832", "--output", str(tmp_path / "x.mp4")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "detected" in line]
    assert lines == ["cache      cache.preset=wan2.1-t2v-1.3b (MagCache), detected: transformer/config.json has the "
                     "shape of Wan 2.1 T2V 1.3B (num_layers 30, num_attention_heads 12, in_channels 16, ffn_dim 8960)"]
