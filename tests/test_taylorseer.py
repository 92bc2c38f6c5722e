"""TaylorSeer: its decisions and latents against diffusers' own TaylorSeerCacheConfig hook on the
tiny model of every family (full and lite forms), the Taylor arithmetic against a hand
computation, DBCache's TaylorSeer calibrator, and bad input. (The shared battery,
test_cache_battery.py, covers lockstep under every layout and that no collective is issued.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import families
from unison.caching import taylorseer
from unison.engine.config import (CacheConfig, ModelConfig, OutputConfig, RunConfig, SamplingConfig,
                                  cache_from_dict, load_yaml)
from unison.engine.render import Engine
from unison.engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WAN_MODULES = (r"blocks\.\d+\.(attn1|attn2|ffn)",)
"""What diffusers must be told on Wan: its default identifiers match no Wan module (re.fullmatch
of "^blocks.*attn" against "blocks.0.attn1" fails)."""


def _diffusers_run(pipe, family: str, settings: dict, sampling: SamplingConfig, monkeypatch):
    """diffusers' TaylorSeer hook on every expert of `pipe`; (its decision at every forward of the
    first hooked module of each expert, in call order, the latents)."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, apply_taylorseer_cache
    from diffusers import TaylorSeerCacheConfig

    decisions: list[tuple[int, bool]] = []
    measure = TaylorSeerCacheHook._measure_should_compute

    def record(hook):
        compute, state = measure(hook)
        decisions.append((id(hook), compute))
        return compute, state

    monkeypatch.setattr(TaylorSeerCacheHook, "_measure_should_compute", record)
    lite = settings.get("lite", False)
    config = TaylorSeerCacheConfig(
        cache_interval=settings["interval"], disable_cache_before_step=settings["warmup_steps"],
        max_order=settings.get("max_order", 1), use_lite_mode=lite,
        taylor_factors_dtype=taylorseer.FACTOR_DTYPES[settings.get("factors_dtype", "bfloat16")],
        cache_identifiers=None if lite else list(settings["modules"]))
    firsts = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        apply_taylorseer_cache(model, config)
        hooked = [m for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
                  and m._diffusers_hook.get_hook("taylorseer_cache") is not None]
        firsts.append(id(hooked[0]._diffusers_hook.get_hook("taylorseer_cache")))
    latents = families.run(pipe, family, sampling)
    return [compute for hook, compute in decisions if hook in firsts], latents


HUNYUAN_MODULES = (r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+")
CASES = [pytest.param("wan", dict(modules=WAN_MODULES, factors_dtype="float32"), id="wan-full"),
         pytest.param("wan", dict(lite=True), id="wan-lite"),
         pytest.param("wan2.2", dict(modules=WAN_MODULES), id="wan2.2-full"),
         pytest.param("wan2.2-ti2v", dict(lite=True), id="wan2.2-ti2v-lite"),
         pytest.param("wan-i2v", dict(modules=WAN_MODULES), id="wan-i2v-full"),
         pytest.param("wan2.2-i2v", dict(lite=True), id="wan2.2-i2v-lite"),
         pytest.param("hunyuanvideo", dict(modules=HUNYUAN_MODULES), id="hunyuan-full"),
         pytest.param("hunyuanvideo", dict(lite=True, factors_dtype="float32"), id="hunyuan-lite")]


@pytest.mark.parametrize("family,form", CASES)
def test_taylorseer_decides_and_predicts_like_diffusers(tiny_folder, family, form, monkeypatch, tmp_path):
    """6 steps, interval 2, warm-up 2: steps 0, 1 compute, 2 predicts (order 1 from 0 and 1), 3
    computes, 4 predicts (the slope over 1 -> 3: a divided difference by 2), 5 computes. On Wan 2.2
    each expert counts its own steps, as diffusers' hook on each transformer does."""
    folder = tiny_folder(family)
    settings = dict(interval=2, warmup_steps=2, **form)
    sampling = families.sampling(family, steps=6, folder=tmp_path)
    ours = Engine.from_config(RunConfig(
        model=ModelConfig(path=folder), sampling=sampling, output=OutputConfig(decode=False, progress=False),
        cache=CacheConfig(kind="taylorseer", **settings))).render()
    theirs, latents = _diffusers_run(families.pipeline(family, folder), family, settings, sampling, monkeypatch)

    # In call order: by step (the experts' steps do not overlap), the conditional branch first.
    mine = [d[-1] for d in sorted((d for e in ours.cache_decisions.values() for d in e),
                                  key=lambda d: (d[0], d[1] != "cond"))]
    assert mine == theirs
    assert True in theirs and False in theirs
    assert torch.equal(ours.latents, latents)  # the same arithmetic in the same order: bitwise


def test_the_schedule_is_diffusers_rule_in_each_experts_own_steps():
    """A hand-written table: tiny Wan 2.2, 8 steps, the high-noise expert runs 0-2 and the
    low-noise one 3-7; interval 3, warm-up 1. Each expert: own step 0 computes, 1 predicts,
    2 computes ((2 - 1 - 1) % 3 == 0), 3 and 4 predict."""
    config = RunConfig(model=ModelConfig(family="wan2.2"), output=OutputConfig(decode=False, progress=False),
                       sampling=SamplingConfig(steps=8, height=48, width=64, frames=9, negative_prompt="blurred"),
                       cache=CacheConfig(kind="taylorseer", interval=3, warmup_steps=1, lite=True))
    result = Engine.from_config(config).render()
    expected = {"transformer": [True, False, True], "transformer_2": [True, False, True, False, False]}
    for expert, marks in expected.items():
        for context in ("cond", "uncond"):
            assert [d[-1] for d in result.cache_decisions[expert] if d[1] == context] == marks, (expert, context)


def test_taylor_factors_and_prediction_equal_a_hand_computation():
    """Order 2 on y(s) = 1 + 2s + 3s^2 computed at steps 0, 2, 3: F1 and F2 are the divided
    differences, and the prediction at step 5 (two after 3) is Σ Fk 2^k / k!."""
    y = {s: torch.tensor([1.0 + 2 * s + 3 * s * s]) for s in (0, 2, 3)}
    factors = taylorseer.update(None, (y[0],), None, 2, torch.float64)
    assert len(factors[0]) == 1  # no slope from one point
    factors = taylorseer.update(factors, (y[2],), 2, 2, torch.float64)
    assert [f.item() for f in factors[0]] == [17.0, (17.0 - 1.0) / 2]
    factors = taylorseer.update(factors, (y[3],), 1, 2, torch.float64)
    f0, f1, f2 = (f.item() for f in factors[0])
    assert (f0, f1, f2) == (34.0, 17.0, (17.0 - 8.0) / 1)
    [predicted] = taylorseer.predict(factors, 2, [torch.float64])
    assert predicted.item() == 34.0 + 17.0 * 2 + 9.0 * 4 / math.factorial(2)


def _release_schedule(start: int, end: int, interval: int, total: int) -> list[int]:
    """HunyuanVideo 1.5's release: the steps that never use its cache (AngelSlim's
    no_cache_steps: the first `start`, every `interval`-th from `start` to `end`, the rest)."""
    return [*range(0, start), *range(start, end, interval), *range(end, total)]


def test_a_written_schedule_runs_every_block_on_exactly_its_steps(tiny_folder, tmp_path):
    """HunyuanVideo 1.5's release schedule at 8 steps (start 2, end 6, interval 3: steps 0, 1, 2,
    5, 6, 7 compute), lite and order 2 as its recipe: the first block's attention runs on those
    steps only, in both branches, counted by a hook inside the block (the block itself is still
    called on a predicted step, and passed over; the cache's own record is not the evidence)."""
    compute = _release_schedule(2, 6, 3, 8)
    assert compute == [0, 1, 2, 5, 6, 7]
    config = RunConfig(model=ModelConfig(path=tiny_folder("hunyuanvideo1.5")),
                       sampling=families.sampling("hunyuanvideo1.5", steps=8, folder=tmp_path),
                       output=OutputConfig(decode=False, progress=False),
                       cache=CacheConfig(kind="taylorseer", lite=True, max_order=2, compute_steps=compute))
    engine = Engine.from_config(config)
    step, ran = [0], []
    engine.pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(lambda *_: ran.append(step[0]))

    def on_step(record) -> None:
        step[0] = record.index + 1

    result = engine.render(config, on_step=on_step)
    assert ran == [s for s in compute for _branch in ("cond", "uncond")]
    assert torch.isfinite(result.latents).all()


def test_the_hunyuanvideo15_recipe_is_its_release_schedule(capsys):
    """configs/hunyuanvideo1.5/taylorseer.yaml holds the release's defaults (start 11, end 45,
    interval 4, of 50 steps), and `unison plan` counts the 25 of 50 it predicts from them."""
    from unison.launch.cli import main

    recipe = ROOT / "configs" / "hunyuanvideo1.5" / "taylorseer.yaml"
    config = load_yaml(recipe)
    assert list(config.cache.compute_steps) == _release_schedule(11, 45, 4, 50)
    assert config.sampling.steps == 50
    assert main(["plan", "--config", str(recipe), "--gpus", "8"]) == 0
    assert "taylorseer, 50% of steps skipped (its schedule)" in capsys.readouterr().out.splitlines()[0]


def test_a_written_schedule_past_the_run_is_refused_before_loading(monkeypatch):
    """The release's schedule needs its 50 steps (its pipeline asserts them): a shorter run is a
    one-line error before any model is built."""
    from unison.engine import load

    def never(plan):
        raise AssertionError("a model was built")

    monkeypatch.setattr(load, "load_pipeline", never)
    config = RunConfig(model=ModelConfig(family="hunyuanvideo1.5"), output=OutputConfig(decode=False, progress=False),
                       sampling=SamplingConfig(steps=30, frames=9),
                       cache=CacheConfig(kind="taylorseer", lite=True, compute_steps=_release_schedule(11, 45, 4, 50)))
    with pytest.raises(UserError) as err:
        Engine.from_config(config)
    assert str(err.value) == ("cache.compute_steps names step 49, past the last of 30 steps (0 to 29): write the "
                              "schedule for this run's steps")


@pytest.mark.parametrize("cache,message", [
    (dict(interval=0), "interval must be at least 1, got 0"),
    (dict(max_order=-1), "max_order must be at least 0, got -1"),
    (dict(factors_dtype="fp8"), "factors_dtype must be one of float32, bfloat16, float16, got 'fp8'"),
    (dict(lite=True, modules=["proj_out"]), "lite predicts proj_out alone: leave modules null"),
    (dict(modules=["blocks[.attn1"]), "modules: 'blocks[.attn1' is not a regular expression"),
    (dict(compute_steps=[]), "compute_steps must be a non-empty list of step numbers (0 or more), got []"),
    (dict(compute_steps=[0, 3, 3]), "compute_steps must rise, each step once, got [0, 3, 3]"),
    (dict(compute_steps=[0, -2]), "compute_steps must be a non-empty list of step numbers (0 or more), got [0, -2]"),
    (dict(threshold=0.1), "unknown config key 'cache.threshold' for cache kind taylorseer; allowed in "
                          "'taylorseer': kind, verify, interval, warmup_steps, compute_from_step, max_order"),
])
def test_bad_input_is_one_line(cache, message):
    with pytest.raises(UserError) as err:
        cache_from_dict({"kind": "taylorseer", **cache})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_modules_that_match_nothing_are_a_clear_error_before_the_first_step():
    config = RunConfig(model=ModelConfig(family="wan"), output=OutputConfig(decode=False, progress=False),
                       sampling=SamplingConfig(steps=2, height=48, width=64, frames=9),
                       cache=CacheConfig(kind="taylorseer", modules=("blocks\\.\\d+\\.attn9",)))
    with pytest.raises(UserError, match=r"cache: modules \['blocks\\\\.\\\\d\+\\\\.attn9'\] match no module of "
                                        r"WanTransformer3DModel"):
        Engine.from_config(config).render()

