"""The battery every cache kind in the registry passes (caching/registry.py), present and future.

For each kind, on the tiny models: a setting that never skips renders exactly what no cache
renders; a mixed setting skips some and computes some; state resets between videos, so the same
engine renders the same video twice; a render stopped mid-way resumes from its step checkpoint
exactly; applying twice fails; removing restores the transformer.

Lockstep (tiny Wan; HunyuanVideo under CFG 2 x Ulysses 2): under Ulysses 2, Ring 2, Ulysses 2 x
Ring 2, CFG 2, CFG 2 x Ulysses 2 and patch 2 (warm-up over every step, so exact), with verify
on, every rank takes the one-rank schedule step for step and reaches the one-rank latents. A
schedule-only cache issues no collective for its decisions (the all-reduces and all-gathers of a
render are those of no cache); a data-dependent one agrees by all-reduced sums. Which it is, is
what the applied cache says (`Cache.decides`): TeaCache's depends on the model. EasyCache's are
data-dependent but read tensors every rank holds whole: without CFG parallelism it says it issues
no collective (`issues_collectives`) and adds none (a skipped forward also skips the output's
gather). The multi-rank cases run in two calls of the shared rank pool.

A new kind adds its two settings to SETTINGS below.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from multirank import run_ranks
from test_parallel_engine import _config
from unison.caching import registry
from unison.engine.plan import plan_run
from unison.engine.caches import apply_caches
from unison.engine.io.checkpoint import fingerprint
from unison.engine.config import CacheConfig, ParallelConfig, RunConfig, config_from_dict, dump_yaml, load_yaml
from unison.engine.models import SPECS
from unison.engine.render import Engine
from unison.engine.errors import UserError

def _representatives() -> tuple[str, ...]:
    """One family per distinct split plan and cache hints (what a cache's decisions, lockstep and
    state depend on), in registry order: a family with its own joins with no edit here."""
    seen, out = set(), []
    for family, spec in SPECS.items():
        if (id(spec.token_plan), id(spec.cache_hints)) not in seen:
            seen.add((id(spec.token_plan), id(spec.cache_hints)))
            out.append(family)
    return tuple(out)


FAMILIES = _representatives()
"""Wan, HunyuanVideo and SkyReels-V2 today."""


def _tuned(family: str) -> str:
    """Whose tuned mixed settings a family takes: its own, else those of the first family that
    shares its cache hints (the same blocks, so the same thresholds fit)."""
    hints = SPECS[family].cache_hints
    return next(f for f, spec in SPECS.items() if spec.cache_hints is hints and f in ("wan", "hunyuanvideo"))


@dataclass(frozen=True)
class Settings:
    never: CacheConfig
    """Never skips: the output equals no cache's, bitwise."""
    mixed: dict[str, CacheConfig]
    """Per tuned family (`_tuned`): skips some and computes some on the tiny run (Wan: 4 steps at t = 999, 900,
    750, 500; HunyuanVideo: 3 steps at t = 1000, 875, 667)."""


SETTINGS = {
    # Thresholds between the tiny models' first-block changes (Wan ~0.09-0.12, HunyuanVideo ~0.2-0.4).
    "fbcache": Settings(never=CacheConfig(kind="fbcache", threshold=0.0),
                        mixed={"wan": CacheConfig(kind="fbcache", threshold=0.105),
                               "hunyuanvideo": CacheConfig(kind="fbcache", threshold=0.34)}),
    "pab": Settings(never=CacheConfig(kind="pab", self_skip_range=None, cross_skip_range=None),
                    mixed=dict.fromkeys(FAMILIES, CacheConfig(
                        kind="pab", self_skip_range=2, self_timestep_min=500, self_timestep_max=990,
                        cross_skip_range=3, cross_timestep_min=500, cross_timestep_max=990))),
    # Ratios 1.0, 0.99, 0.9, 0.99 (HunyuanVideo's 3 steps resample them to 1.0, 0.9, 0.99):
    # a step at 0.99 accumulates 0.01 and skips; one at 0.9 accumulates 0.1 and computes.
    "magcache": Settings(never=CacheConfig(kind="magcache", mag_ratios=(1.0, 0.99), max_skip_steps=0),
                         mixed=dict.fromkeys(FAMILIES, CacheConfig(
                             kind="magcache", mag_ratios=(1.0, 0.99, 0.9, 0.99), threshold=0.05,
                             max_skip_steps=2, retention_ratio=0.0))),
    # The identity polynomial rescales nothing. Tiny Wan's timestep modulation changes by 0.43,
    # 0.33, 0.39 at steps 1-3 (both branches): at 0.5 it skips, computes (0.43 + 0.33), skips.
    # Tiny HunyuanVideo's modulated input changes by ~0.065 at step 1 and ~0.11 at step 2: at 0.1
    # it skips step 1 and computes step 2 (0.17), both decided on agreed sums.
    "teacache": Settings(never=CacheConfig(kind="teacache", coefficients=(0, 0, 0, 1, 0), threshold=0.0),
                         mixed={family: CacheConfig(kind="teacache", coefficients=(0, 0, 0, 1, 0), threshold=threshold,
                                                    warmup_steps=1, compute_last=False)
                                for family, threshold in (("wan", 0.5), ("hunyuanvideo", 0.1))}),
    # Wan: Fn 1, Bn 1 (3 blocks: one cached); HunyuanVideo: Fn 2, Bn 1 (4 blocks: one cached). The
    # front's change on the tiny runs: Wan ~0.11-0.12, HunyuanVideo ~0.35-0.36.
    "dbcache": Settings(never=CacheConfig(kind="dbcache", threshold=0.0, front_blocks=1, back_blocks=1),
                        mixed={"wan": CacheConfig(kind="dbcache", threshold=0.115, front_blocks=1, back_blocks=1),
                               "hunyuanvideo": CacheConfig(kind="dbcache", threshold=0.36, front_blocks=2,
                                                           back_blocks=1)}),
    # Steps 0 and 1 compute (warm-up, then k is unknown until two computes); the accumulated
    # prediction at step 2 is ~0.28 (Wan) / ~0.18 (HunyuanVideo) and skips, Wan's step 3 reaches
    # ~0.63 and computes.
    "easycache": Settings(never=CacheConfig(kind="easycache", threshold=0.0),
                          mixed={family: CacheConfig(kind="easycache", threshold=threshold, warmup_steps=1,
                                                     compute_last=False)
                                 for family, threshold in (("wan", 0.4), ("hunyuanvideo", 0.3))}),
    # Interval 1 computes every step. Warm-up 1, interval 2: steps 0 and 2 compute, 1 and 3 predict;
    # the full form (the default modules) on Wan, the lite form on HunyuanVideo. Factors in float32:
    # in bfloat16 an N-rank attention's last-bit difference can round a factor to the next
    # bfloat16 value (Ring 2: 1.6e-5 off one rank), which is the factors' precision, not lockstep.
    "taylorseer": Settings(never=CacheConfig(kind="taylorseer", interval=1),
                           mixed={"wan": CacheConfig(kind="taylorseer", warmup_steps=1, interval=2,
                                                     factors_dtype="float32"),
                                  "hunyuanvideo": CacheConfig(kind="taylorseer", warmup_steps=1, interval=2,
                                                              lite=True, factors_dtype="float32")}),
}
KINDS = list(registry.KINDS)


def _cached(family: str, cache: CacheConfig, parallel: ParallelConfig = ParallelConfig()) -> RunConfig:
    return dataclasses.replace(_config(family, 48, parallel), cache=cache)


def _flags(decisions: dict[str, list[tuple]]) -> list[bool]:
    return [d[-1] for expert in decisions.values() for d in expert]


class Stopped(Exception):
    pass


def _stop_after(index: int):
    def on_step(record):
        if record.index == index:
            raise Stopped
    return on_step


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_kind_has_settings_and_a_documented_config():
    assert set(SETTINGS) == set(registry.KINDS), "add the new kind's never/mixed settings to SETTINGS"
    for name, kind in registry.KINDS.items():
        assert kind.decides in ("schedule-only", "data-dependent")
        assert kind.config().kind == name and SETTINGS[name].never.kind == name
        for f in dataclasses.fields(kind.config):
            if f.name != "verify":  # documented once, in the base class
                # In the class that declares it last (DBCache inherits First-Block Cache's fields).
                owner = next(c for c in kind.config.__mro__ if f.name in vars(c).get("__annotations__", {}))
                source = inspect.getsource(owner)
                assert '"""' in source.split(f"    {f.name}:", 1)[1].split("\n")[1], (name, f.name)


def refused_before_loading(cache: dict, message: str) -> None:
    """A cache section that `plan_run` (config files only, no weights) refuses with a one-line
    error containing `message`: the bad-input tables of the kinds' own test files use it."""
    with pytest.raises(UserError, match=re.escape(message)) as err:
        plan_run(config_from_dict({"model": {"family": "wan"}, "cache": cache}))
    assert "\n" not in str(err.value)


def test_every_kind_that_does_not_take_pipefusion_is_refused_under_it():
    """Under PipeFusion a kind whose registry entry says it cannot work there is a one-line error
    before loading that names the kinds that can (First-Block Cache); those plan."""
    able = [name for name, kind in registry.KINDS.items() if kind.pipefusion]
    assert able == ["fbcache"]
    for name, kind in registry.KINDS.items():
        config = _cached("wan", SETTINGS[name].never, ParallelConfig(patch=2, patch_mode="pipefusion"))
        if kind.pipefusion:
            assert plan_run(config, world_size=2).config.cache.kind == name
            continue
        with pytest.raises(UserError, match=re.escape(f"{kind.title} under PipeFusion is not supported: use "
                                                      "cache.kind=fbcache or parallel.patch_mode=displaced")) as err:
            plan_run(config, world_size=2)
        assert "\n" not in str(err.value)


def test_every_kind_round_trips_and_fingerprints_its_fields(tmp_path):
    """The resolved config written beside a video reads back as the same config, and a step
    checkpoint of one kind's settings is never resumed under another's."""
    configs = [_cached("wan", CacheConfig())] + [_cached("wan", cache) for kind in KINDS
                                                  for cache in (SETTINGS[kind].never, SETTINGS[kind].mixed["wan"])]
    for index, config in enumerate(configs):
        path = tmp_path / f"{index}.yaml"
        path.write_text(dump_yaml(config))
        assert load_yaml(path) == config
    assert len({fingerprint(config, world_size=1) for config in configs}) == len(configs)
    verified = dataclasses.replace(configs[-1], cache=dataclasses.replace(configs[-1].cache, verify=True))
    assert fingerprint(verified, world_size=1) == fingerprint(configs[-1], world_size=1)


@pytest.fixture(scope="module")
def reference():
    """No cache, one engine per family (shared by every kind)."""
    engines = {family: Engine.from_config(_cached(family, CacheConfig())) for family in FAMILIES}
    return {family: (engine, engine.render().latents) for family, engine in engines.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_battery(kind, family, reference, tmp_path):
    plain, expected = reference[family]
    assert torch.equal(plain.render().latents, expected)  # an engine renders the same video twice

    # Never skipping changes nothing, and every decision is "compute".
    engine = Engine.from_config(_cached(family, SETTINGS[kind].never))
    never = engine.render()
    assert torch.equal(never.latents, expected)
    assert never.cache_decisions and all(_flags(never.cache_decisions))

    # The mixed setting skips some, computes some, changes the output and says so.
    mixed = _cached(family, SETTINGS[kind].mixed[_tuned(family)])
    first = engine.render(mixed)
    assert {True, False} <= set(_flags(first.cache_decisions))
    assert not torch.equal(first.latents, expected)
    assert any(line.startswith(kind) and "skipped" in line for line in first.cache_lines)

    # State resets between videos: the same engine repeats the video exactly.
    second = engine.render(mixed)
    assert second.cache_decisions == first.cache_decisions
    assert torch.equal(second.latents, first.latents)

    # A render stopped after step 1 resumes from its step checkpoint (in a new engine, as after a
    # restart) with the same decisions and latents.
    stopped = dataclasses.replace(mixed, output=dataclasses.replace(
        mixed.output, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt")))
    with pytest.raises(Stopped):
        engine.render(stopped, on_step=_stop_after(1))
    resumed = Engine.from_config(stopped).render()
    assert resumed.loop.resumed_from_step == 2
    assert resumed.cache_decisions == first.cache_decisions
    assert torch.equal(resumed.latents, first.latents)

    # Applying twice fails; removing restores the transformer (no wrapper left, same output).
    transformer = engine.pipe.transformer
    forwards = {name: type(m).forward for name, m in transformer.named_modules()}
    with pytest.raises(RuntimeError, match="already applied"):
        apply_caches(engine.pipe, engine.plan.spec, mixed.cache)
    engine.caches["transformer"].remove()
    assert not [m for m in transformer.modules() if "forward" in vars(m)]
    assert {name: type(m).forward for name, m in transformer.named_modules()} == forwards
    engine.assembly.caches, engine.assembly.cache_config = {}, None
    assert torch.equal(engine.render(_cached(family, CacheConfig())).latents, expected)


# ---------------------------------------------------------------------------------------------
# Lockstep: every kind, every layout, one pool call per world size.

LAYOUTS = {2: [*[(family, dict(ulysses=2)) for family in FAMILIES], ("wan", dict(ring=2)), ("wan", dict(cfg=2)),
               ("wan", dict(patch=2, patch_warmup_steps=4))],
           4: [("wan", dict(ulysses=2, ring=2)), ("wan", dict(cfg=2, ulysses=2)),
               ("hunyuanvideo", dict(cfg=2, ulysses=2))]}
"""Per world size: (family, layout), one engine each, rendering every kind's mixed setting: every
representative family (one per split plan and cache hints) under Ulysses 2, Wan under the rest."""
COUNTED = ("wan", dict(ulysses=2))
"""Where the collectives of each kind's decisions are counted (verify off)."""


def _lockstep_ranks(rank, world, runs, folder):
    """runs: [(config, caches, resumed)]: one engine per config's layout, a render per cache, then
    for each of `resumed` a render stopped after step 1 and resumed from its checkpoint."""
    out = []
    for config, caches, resumed in runs:
        engine = Engine.from_config(config, world_size=world)
        for cache in caches:
            result = engine.render(dataclasses.replace(config, cache=cache))
            # A kind may decide by model; EasyCache decides on data every rank holds whole (no message).
            decides = {name: "whole-tensors" if not c.issues_collectives else c.decides
                       for name, c in engine.caches.items()}
            out.append((result.latents, result.cache_decisions, dict(result.comm_calls), decides))
        for cache in resumed:
            stopped = dataclasses.replace(config, cache=cache, output=dataclasses.replace(
                config.output, checkpoint_every=1, checkpoint_dir=str(Path(folder) / cache.kind)))
            try:
                engine.render(stopped, on_step=_stop_after(1))
            except Stopped:
                pass
            result = engine.render(stopped)
            out.append((result.latents, result.cache_decisions, {}, result.loop.resumed_from_step))
        del engine
    return out


def _runs(world: int) -> tuple[list, list]:
    """(runs for _lockstep_ranks, a label per render: (family, layout, kind or None, mode)); mode:
    "verify" (verify on), "count" (verify off, collectives counted), "resume" (stopped and resumed)."""
    runs, labels = [], []
    for family, layout in LAYOUTS[world]:
        where = (family, tuple(layout.items()))
        caches = [dataclasses.replace(SETTINGS[kind].mixed[_tuned(family)], verify=True) for kind in KINDS]
        labels += [(*where, kind, "verify") for kind in KINDS]
        resumed = []
        if (family, layout) == COUNTED:
            caches += [CacheConfig(), *[SETTINGS[kind].mixed[_tuned(family)] for kind in KINDS]]
            labels += [(*where, None, "count"), *[(*where, kind, "count") for kind in KINDS]]
            resumed = [SETTINGS[kind].mixed[_tuned(family)] for kind in KINDS]
            labels += [(*where, kind, "resume") for kind in KINDS]
        runs.append((_cached(family, CacheConfig(), ParallelConfig(**layout, timeout_s=60)), caches, resumed))
    return runs, labels


@pytest.fixture(scope="module")
def one_rank(reference):
    """The one-rank latents and schedule of every kind's mixed setting, per family."""
    out = {}
    for family in FAMILIES:
        engine = reference[family][0]
        for kind in KINDS:
            result = engine.render(_cached(family, SETTINGS[kind].mixed[_tuned(family)]))
            for context in ("cond", "uncond"):  # mixed in each branch, so a CFG half's schedule means something
                flags = {d[-1] for d in result.cache_decisions["transformer"] if d[1] == context}
                assert flags == {True, False}, (family, kind, context)
            out[family, kind] = result
    return out


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_lockstep_every_kind_every_layout(world, one_rank, tmp_path):
    """...and under Ulysses 2 every kind's render stopped after step 1 resumes from its checkpoints
    (one file per rank) bit-identical to the uninterrupted Ulysses 2 render, same decisions."""
    runs, labels = _runs(world)
    per_rank = run_ranks(world, _lockstep_ranks, runs, str(tmp_path))
    counted: dict[str | None, list[tuple[dict, dict]]] = {}
    for rank, renders in enumerate(per_rank):
        assert len(renders) == len(labels)
        whole = {(family, layout, kind): render for (family, layout, kind, mode), render
                 in zip(labels, renders, strict=True) if mode == "count"}
        for (family, layout, kind, mode), (latents, decisions, calls, decides) in zip(labels, renders, strict=True):
            if mode == "count":
                counted.setdefault(kind, []).append((calls, decides))
                continue
            if mode == "resume":
                uninterrupted = whole[family, layout, kind]
                assert decides == 2, (kind, rank)  # resumed_from_step: the checkpoint after step 1
                assert torch.equal(latents, uninterrupted[0]) and decisions == uninterrupted[1], (kind, rank)
                continue
            one = one_rank[family, kind]
            if dict(layout).get("cfg", 1) == 1:
                assert decisions == one.cache_decisions, (family, layout, kind, rank)
            else:  # each cfg half holds its own branch's context: together they are the one-rank schedule
                mine = {d[1] for d in decisions["transformer"]}
                assert len(mine) == 1
                assert decisions["transformer"] == [d for d in one.cache_decisions["transformer"] if d[1] in mine]
            assert _rel(latents, one.latents) <= 1e-5, (family, layout, kind, rank)
    if world == 2:
        assert sum(mode == "resume" for *_, mode in labels) == len(KINDS)
    if world == 2:  # the collectives each kind's decisions cost under Ulysses 2, on every rank
        assert len(counted[None]) == world and all(len(counted[kind]) == world for kind in KINDS)
        for kind in KINDS:
            for (mine, decides), (none, _) in zip(counted[kind], counted[None], strict=True):
                assert mine["all_to_all"] < none["all_to_all"]  # skipped blocks skip their all-to-alls
                if decides["transformer"] == "schedule-only":  # as the applied cache says (Cache.decides)
                    assert mine.get("all_reduce", 0) == none.get("all_reduce", 0), kind
                    assert mine.get("all_gather", 0) == none.get("all_gather", 0), kind
                elif decides["transformer"] == "whole-tensors":  # data every rank holds: nothing added
                    assert mine.get("all_reduce", 0) <= none.get("all_reduce", 0), kind
                    assert mine.get("all_gather", 0) < none.get("all_gather", 0), kind
                else:
                    assert mine.get("all_reduce", 0) > none.get("all_reduce", 0), kind


def _numeric_fields(kind: str) -> list[tuple[str, bool]]:
    """(field, takes floats) for every scalar number in the kind's config (not flags, not lists)."""
    hints = typing.get_type_hints(registry.KINDS[kind].config)
    found = []
    for f in dataclasses.fields(registry.KINDS[kind].config):
        types_ = typing.get_args(hints[f.name]) or (hints[f.name],)
        if bool not in types_ and (int in types_ or float in types_):
            found.append((f.name, float in types_))
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_refuses_the_same_classes_of_values(kind):
    """Every numeric field of every kind: a negative value, and for real numbers NaN and infinity,
    are one line naming the field, before loading (a negative TeaCache threshold never skipped)."""
    never = SETTINGS[kind].never
    base = {f.name: getattr(never, f.name) for f in dataclasses.fields(never) if getattr(never, f.name) is not None}
    fields = _numeric_fields(kind)
    assert fields, kind
    for name, real in fields:
        for bad in (-1, *((math.nan, math.inf) if real else ())):
            with pytest.raises(UserError) as err:
                plan_run(config_from_dict({"model": {"family": "wan"}, "cache": {**base, name: bad}}))
            message = str(err.value)
            assert f"cache.{name}" in message or ("cache." in message and name in message), (kind, name, bad, message)
            assert "\n" not in message
