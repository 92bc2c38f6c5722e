"""EasyCache: the rule against a hand computation with numpy on the transformer's inputs and
outputs a render recorded, CFG parallelism taking the one-rank decisions, no collective without
CFG parallelism, the presets, and bad input. (The shared battery, test_cache_battery.py, covers
its lockstep under every layout.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from multirank import run_ranks
from test_cache_battery import refused_before_loading
from unison.engine.config import (CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig,
                                  load_yaml)
from unison.engine.render import Engine

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
# On this tiny Wan run a step adds ~0.17-0.26 to the accumulated prediction once k is known: at 0.35
# the schedule is CCSCSSCC (asserted below to mix skips and computes, so it cannot pass vacuously).
MIXED = CacheConfig(kind="easycache", threshold=0.35, warmup_steps=2, compute_last=True)


def _run(cache: CacheConfig, parallel: ParallelConfig = ParallelConfig()) -> RunConfig:
    return RunConfig(model=ModelConfig(family="wan"), cache=cache, parallel=parallel,
                     sampling=SamplingConfig(height=32, width=32, frames=5, steps=STEPS, negative_prompt="blurred"),
                     output=OutputConfig(decode=False, progress=False))


def _record(transformer) -> list[tuple[np.ndarray, np.ndarray]]:
    """A forward hook on the transformer (around the cache) recording every forward's latent input
    and returned output, whether computed or reused."""
    seen = []

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((hidden.double().numpy(), output[0].double().numpy()))

    transformer.register_forward_hook(hook, with_kwargs=True)
    return seen


def _rule(forwards, *, threshold: float, warmup: int, last: bool, steps: int) -> list[bool]:
    """EasyCache's rule written out with numpy (compute: True): the conditional branch decides
    for both; k = mean|Δy| / mean|Δx| between its last two computed forwards."""
    led, out = {}, []
    prev = x_done = y_done = k = None
    acc = 0.0
    for step, context, x, y in forwards:
        if context != "cond":
            out.append(led[step])
            continue
        if step < warmup or (last and step == steps - 1) or k is None:
            compute, acc = True, 0.0
        else:
            acc += k * np.abs(x - prev).mean() / np.abs(y_done).mean()
            compute = bool(acc >= threshold)
            if compute:
                acc = 0.0
        prev, led[step] = x, compute
        if compute:
            if y_done is not None:
                k = np.abs(y - y_done).mean() / np.abs(x - x_done).mean()
            x_done, y_done = x, y
        out.append(compute)
    return out


@pytest.fixture(scope="module")
def one_rank():
    engine = Engine.from_config(_run(CacheConfig()))
    seen = _record(engine.pipe.transformer)
    plain = engine.render()
    seen.clear()
    result = engine.render(_run(MIXED))
    return plain, result, list(seen), list(engine.caches["transformer"].values)


def test_decisions_are_the_rule_computed_by_hand(one_rank):
    _, result, seen, values = one_rank
    decisions = result.cache_decisions["transformer"]
    assert len(seen) == len(decisions) == 2 * STEPS
    forwards = [(d[0], d[1], x, y) for d, (x, y) in zip(decisions, seen)]
    expected = _rule(forwards, threshold=MIXED.threshold, warmup=MIXED.warmup_steps, last=True, steps=STEPS)
    assert [d[-1] for d in decisions] == expected
    for context in ("cond", "uncond"):  # skips and computes in each branch, the same steps
        assert {d[-1] for d in decisions if d[1] == context} == {True, False}
    assert [d[-1] for d in decisions if d[1] == "cond"] == [d[-1] for d in decisions if d[1] == "uncond"]
    assert values and all(step >= MIXED.warmup_steps for step, _ in values)
    # A skipped forward returns its input plus its branch's last computed output − input.
    done = {}
    for (step, context, x, y), compute in zip(forwards, expected):
        if compute:
            done[context] = y - x
        else:
            np.testing.assert_allclose(y, x + done[context], rtol=1e-6, atol=1e-6)


def test_never_skipping_is_no_cache(one_rank):
    plain = one_rank[0]
    engine = Engine.from_config(_run(CacheConfig(kind="easycache", threshold=0.0, warmup_steps=0)))
    result = engine.render()
    assert torch.equal(result.latents, plain.latents)
    assert all(d[-1] for d in result.cache_decisions["transformer"])


def _ranks(rank, world):
    out = {}
    for name, layout in (("cfg", dict(cfg=2)), ("ulysses", dict(ulysses=2))):
        engine = Engine.from_config(_run(CacheConfig(), ParallelConfig(**layout, timeout_s=60)), world_size=world)
        none = dict(engine.render().comm_calls)
        result = engine.render(_run(dataclasses.replace(MIXED, verify=name == "cfg"),
                                    ParallelConfig(**layout, timeout_s=60)))
        out[name] = (result.latents, result.cache_decisions, dict(result.comm_calls), none,
                     len(engine.caches["transformer"].values))
    return out


def test_cfg_parallel_takes_the_one_rank_decisions_and_ulysses_adds_no_collective(one_rank):
    one = one_rank[1]
    for per_rank in run_ranks(2, _ranks):
        # CFG 2: each half holds one branch; together they are the one-rank schedule.
        latents, decisions, *_ = per_rank["cfg"]
        mine = {d[1] for d in decisions["transformer"]}
        assert len(mine) == 1
        assert decisions["transformer"] == [d for d in one.cache_decisions["transformer"] if d[1] in mine]
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5
        # Ulysses 2: the same schedule, and no collective beyond no cache's.
        latents, decisions, calls, none, measured = per_rank["ulysses"]
        assert decisions == one.cache_decisions and measured > 0
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5
        # Each computed forward issues what it does without a cache, a skipped one nothing.
        flags = [d[-1] for d in decisions["transformer"]]
        for name in ("all_reduce", "all_gather", "all_to_all"):
            assert calls.get(name, 0) * len(flags) == none.get(name, 0) * sum(flags), name
        assert calls["all_to_all"] < none["all_to_all"]


def test_presets_are_the_published_settings():
    """The bundled recipes against their source (../shared/cache-facts.md §3.7, the authors'
    scripts): Wan's --thresh default and ret_steps (counted in calls, two a step), HunyuanVideo's
    thresh and ret_steps (one call a step); the last step always computes in both."""
    from published import facts

    section = facts().split("### 3.7 EasyCache")[1].split("\n### ")[0]
    wan_threshold = float(re.search(r"Wan `--thresh` default ([\d.]+)", section).group(1))
    wan_calls, per_step = map(int, re.search(r"`ret_steps = (\d+)\*(\d+)` calls", section).groups())
    hunyuan_threshold, hunyuan_steps = re.search(r"`thresh = ([\d.]+)` and `ret_steps = (\d+)`", section).groups()
    assert "the last step always computes" in section
    published = {"wan2.1-t2v-1.3b": (wan_threshold, wan_calls * per_step // 2),
                 "hunyuanvideo": (float(hunyuan_threshold), int(hunyuan_steps))}
    for model, (threshold, warmup) in published.items():
        recipe = load_yaml(ROOT / "configs" / model / "easycache.yaml")
        cache = recipe.cache
        assert (cache.kind, cache.threshold, cache.warmup_steps, cache.compute_last) == ("easycache", threshold,
                                                                                         warmup, True), model
        assert cache.warmup_steps < recipe.sampling.steps, model  # the rule decides some steps


@pytest.mark.parametrize("cache, message", [
    ({"kind": "easycache", "threshold": float("nan")}, "cache.threshold must be a finite number"),
    ({"kind": "easycache", "threshold": -0.1}, "cache.threshold must be at least 0, got -0.1"),
    ({"kind": "easycache", "warmup_steps": -1}, "cache.warmup_steps must be at least 0, got -1"),
    ({"kind": "easycache", "max_consecutive_skips": 0}, "cache.max_consecutive_skips must be at least 1"),
    ({"kind": "easycache", "mag_ratios": [1.0, 0.9]},
     "unknown config key 'cache.mag_ratios' for cache kind easycache; allowed in 'easycache': kind, verify, threshold"),
])
def test_bad_input_is_one_line_before_anything_loads(cache, message):
    refused_before_loading(cache, message)

