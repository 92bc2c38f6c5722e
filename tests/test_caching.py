"""First-Block Cache's decisions against diffusers' own hook, and invariant 3 (ranks decide in
lockstep, N-rank schedule = one-rank schedule) under every mode for fbcache and pab in depth
(HunyuanVideo, Ulysses 4, joint_cfg, verify naming the ranks). The battery every cache kind passes
is test_cache_battery.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import families
from multirank import run_ranks
from test_parallel_engine import _config
from unison.caching import CacheDisagreement
from unison.engine.config import CacheConfig, ParallelConfig, RunConfig
from unison.engine.render import Engine

# Thresholds between the tiny models' first-block changes (Wan ~0.09-0.12, HunyuanVideo ~0.2-0.4
# at these sizes), so that some steps skip and some compute.
THRESHOLD = {"wan": 0.105, "wan2.2": 0.1, "wan2.2-ti2v": 0.1, "wan-i2v": 0.05, "wan2.2-i2v": 0.1, "hunyuanvideo": 0.34}
# PAB's windows cover the middle of the tiny runs' timesteps (4 steps: Wan 999, 900, 750, 500;
# HunyuanVideo 1000, 955, 875, 700).
PAB = CacheConfig(kind="pab", self_skip_range=2, self_timestep_min=500, self_timestep_max=990,
                  cross_skip_range=3, cross_timestep_min=500, cross_timestep_max=990)


def _cached(family: str, height: int, cache: CacheConfig, parallel: ParallelConfig = ParallelConfig(),
            steps: int = 4) -> RunConfig:
    config = _config(family, height, parallel)
    return dataclasses.replace(config, cache=cache, sampling=dataclasses.replace(config.sampling, steps=steps))


def _fbcache(family: str, **kw) -> CacheConfig:
    return CacheConfig(kind="fbcache", threshold=THRESHOLD[family], **kw)


def _computed(decisions) -> list[bool]:
    return [d[-1] for d in decisions]


# ---------------------------------------------------------------------------------------------
# One rank: the same decisions as diffusers' FirstBlockCacheConfig hook, same threshold, same model.

@pytest.mark.parametrize("family", ["wan", "wan2.2", "wan2.2-ti2v", "wan-i2v", "wan2.2-i2v", "hunyuanvideo"])
def test_fbcache_decides_like_diffusers(tiny_folder, family, tmp_path):
    """On Wan 2.2 diffusers' hook goes on each expert, as unison's cache does: the decisions of
    both, in call order (the experts' steps do not overlap), against ours."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersConfig
    from diffusers.hooks import HookRegistry, apply_first_block_cache as diffusers_apply

    from unison.engine.config import ModelConfig, OutputConfig

    folder, threshold = tiny_folder(family), THRESHOLD[family]
    sampling = families.sampling(family, steps=6, folder=tmp_path)
    ours = Engine.from_config(RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                                        cache=CacheConfig(kind="fbcache", threshold=threshold),
                                        output=OutputConfig(decode=False, progress=False))).render()

    pipe = families.pipeline(family, folder)
    theirs: list[bool] = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        diffusers_apply(model, DiffusersConfig(threshold=threshold))
        first = model.transformer_blocks[0] if family == "hunyuanvideo" else model.blocks[0]
        hook = HookRegistry.check_if_exists_or_initialize(first).get_hook("fbc_leader_block_hook")
        hook._should_compute_remaining_blocks = (
            lambda residual, decide=hook._should_compute_remaining_blocks: theirs.append(decide(residual)) or theirs[-1])
    latents = families.run(pipe, family, sampling)

    mine = [d[-1] for d in sorted((d for e in ours.cache_decisions.values() for d in e),
                                  key=lambda d: (d[0], d[1] != "cond"))]
    assert True in theirs and False in theirs, theirs
    assert mine == theirs
    assert ((ours.latents - latents).norm() / latents.norm()).item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Lockstep: N ranks take the one-rank schedule, step for step, and reach the one-rank latents.

def _render_cached(rank, world, config):
    result = Engine.from_config(config, world_size=world).render()
    return result.latents, result.cache_decisions, result.comm_calls


LAYOUTS = [dict(ulysses=2), dict(ulysses=4), dict(ring=2), dict(ulysses=2, ring=2), dict(cfg=2),
           dict(cfg=2, ulysses=2)]
LOCKSTEP = [(family, layout) for family in ("wan", "hunyuanvideo") for layout in LAYOUTS]


@pytest.mark.parametrize("family, layout", LOCKSTEP,
                         ids=[f + "-" + "x".join(f"{k}{v}" for k, v in l.items()) for f, l in LOCKSTEP])
def test_fbcache_lockstep(family, layout):
    one = Engine.from_config(_cached(family, 48, _fbcache(family))).render()
    flags = _computed(one.cache_decisions["transformer"])
    assert True in flags and False in flags  # the schedule is mixed, so lockstep means something
    parallel = ParallelConfig(**layout, timeout_s=60)
    world = parallel.ulysses * parallel.ring * parallel.cfg
    config = _cached(family, 48, _fbcache(family, verify=True), parallel)
    for latents, decisions, _ in run_ranks(world, _render_cached, config):
        if parallel.cfg == 1:
            assert decisions == one.cache_decisions
        else:  # each cfg half holds its own branch's context: together they are the one-rank schedule
            mine = {d[1] for d in decisions["transformer"]}
            assert len(mine) == 1
            assert decisions["transformer"] == [d for d in one.cache_decisions["transformer"] if d[1] in mine]
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5


def test_pab_skips_the_collectives_of_reused_attention():
    """Ulysses 2, tiny Wan (3 blocks, two branches, steps at t = 999, 900, 750, 500). Self-attention
    (range 2, window 500 < t < 990) is computed at steps 0 (first), 2 (2 % 2 == 0) and 3 (t = 500
    is outside the open window), reused at step 1: 3 blocks x 2 branches x 3 steps = 18 computed
    self-attentions, each 4 all-to-alls (q, k, v, output), so 72 instead of 96 without PAB."""
    parallel = ParallelConfig(ulysses=2, timeout_s=60)
    one = Engine.from_config(_cached("wan", 48, PAB)).render()
    assert [s.timestep for s in one.loop.steps] == [999.0, 900.0, 750.0, 500.0]
    for latents, decisions, calls in run_ranks(2, _render_cached, _cached("wan", 48, PAB, parallel)):
        assert decisions == one.cache_decisions
        assert calls["all_to_all"] == 72
        assert sum(1 for d in decisions["transformer"] if d[2] == "self" and d[3]) == 18
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5


def test_pab_lockstep_joint_attention_with_verify():
    """HunyuanVideo, cfg 2 x ulysses 2, verify on: PAB decisions need no message, and verify
    confirms every rank took each one; each half runs its branch's one-rank schedule."""
    one = Engine.from_config(_cached("hunyuanvideo", 48, PAB)).render()
    parallel = ParallelConfig(cfg=2, ulysses=2, timeout_s=60)
    config = _cached("hunyuanvideo", 48, dataclasses.replace(PAB, verify=True), parallel)
    for latents, decisions, _ in run_ranks(4, _render_cached, config):
        mine = {d[1] for d in decisions["transformer"]}
        assert decisions["transformer"] == [d for d in one.cache_decisions["transformer"] if d[1] in mine]
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5


def _perturbed_rank(rank, world, config):
    """Rank 1 inflates its (already agreed) First-Block Cache metric: its decisions differ."""
    from unison.caching.agree import Agreement

    agreed = Agreement.ratio
    if rank == 1:
        Agreement.ratio = lambda self, num, den: agreed(self, num, den) * 100
    try:
        Engine.from_config(config, world_size=world).render()
    except CacheDisagreement as err:
        return str(err)
    finally:
        Agreement.ratio = agreed  # the rank's process serves later tests
    return "no error"


def test_verify_names_the_disagreeing_ranks_instead_of_hanging():
    one = Engine.from_config(_cached("wan", 48, _fbcache("wan"))).render()
    step, context = next((d[0], d[1]) for d in one.cache_decisions["transformer"] if not d[3])
    config = _cached("wan", 48, _fbcache("wan", verify=True), ParallelConfig(ulysses=2, timeout_s=60))
    messages = run_ranks(2, _perturbed_rank, config)
    # Rank 0 skips where one rank first skips; inflated, rank 1 computes: both ranks stop there.
    assert messages == [f"step {step}: fbcache ({context}) decisions disagree: rank 0 skips, rank 1 computes"] * 2


# ---------------------------------------------------------------------------------------------
# joint_cfg: the conditional branch decides for both; N ranks (CFG parallel included) agree.

# 6 steps; at these thresholds the two branches' own schedules differ, every measured change at
# least 0.0025 away from the threshold.
JOINT_THRESHOLD = {"wan": 0.125, "hunyuanvideo": 0.30}


def _joint(family: str, **kw) -> CacheConfig:
    return CacheConfig(kind="fbcache", threshold=JOINT_THRESHOLD[family], joint_cfg=True, **kw)


def _by_context(decisions) -> dict[str, list[tuple[int, bool]]]:
    out: dict[str, list[tuple[int, bool]]] = {}
    for step, context, _, computed in decisions:
        out.setdefault(context, []).append((step, computed))
    return out


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_joint_cfg_lets_the_conditional_branch_decide_for_both(family):
    own = dataclasses.replace(_joint(family), joint_cfg=False)
    per_branch = _by_context(Engine.from_config(_cached(family, 48, own, steps=6)).render()
                             .cache_decisions["transformer"])
    assert per_branch["cond"] != per_branch["uncond"]  # the branches disagree on their own: joint changes that
    joint = _by_context(Engine.from_config(_cached(family, 48, _joint(family), steps=6)).render()
                        .cache_decisions["transformer"])
    assert {computed for _, computed in joint["cond"]} == {True, False}
    assert joint["cond"] == per_branch["cond"]
    assert joint["uncond"] == joint["cond"]


@pytest.mark.parametrize("family, layout", [("wan", dict(cfg=2)), ("hunyuanvideo", dict(cfg=2, ulysses=2))],
                         ids=["wan-cfg2", "hunyuanvideo-cfg2xulysses2"])
def test_joint_cfg_lockstep_across_cfg_halves(family, layout):
    cache = _joint(family)
    one = Engine.from_config(_cached(family, 48, cache, steps=6)).render()
    parallel = ParallelConfig(**layout, timeout_s=60)
    config = _cached(family, 48, dataclasses.replace(cache, verify=True), parallel, steps=6)
    for latents, decisions, _ in run_ranks(parallel.cfg * parallel.ulysses, _render_cached, config):
        mine = {d[1] for d in decisions["transformer"]}
        assert len(mine) == 1
        assert decisions["transformer"] == [d for d in one.cache_decisions["transformer"] if d[1] in mine]
        assert ((latents - one.latents).norm() / one.latents.norm()).item() <= 1e-5


def test_summary_shows_the_skip_schedule():
    """One mark per step and context: C computed, S skipped, p partly (PAB), . another expert's step."""
    from unison.engine.caches import schedule

    log = [(0, "cond", "blocks", True), (0, "uncond", "blocks", True), (1, "cond", "blocks", False),
           (1, "uncond", "blocks", True), (2, "cond", "attn1", True), (2, "cond", "attn2", False),
           (2, "uncond", "attn1", False), (2, "uncond", "attn2", False)]
    assert schedule(log, 5) == {"cond": "CSp..", "uncond": "CCS.."}
    # A real render's line: as many marks as steps, as many skips as the counts say.
    result = Engine.from_config(_cached("wan", 32, CacheConfig(kind="fbcache", threshold=THRESHOLD["wan"]))).render()
    line = next(line for line in result.cache_lines if line.startswith("fbcache"))
    marks = dict(part.split() for part in line.split("; schedule ")[1].split(", "))
    counts = {c: sum(not d[3] for d in result.cache_decisions["transformer"] if d[1] == c) for c in marks}
    assert {c: len(m) for c, m in marks.items()} == {c: result.config.sampling.steps for c in marks}
    assert {c: m.count("S") for c, m in marks.items()} == counts and sum(counts.values()) > 0
