"""Configs: strict loading, round trip, precedence."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from unison.engine.config import (ModelConfig, RunConfig, SamplingConfig, apply_overrides, config_from_dict,
                                  dump_yaml, load_yaml)
from unison.engine.errors import UserError
from unison.launch.cli import build_config, parser

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip(tmp_path):
    config = RunConfig(model=ModelConfig(family="wan2.2", path="/models/x", dtype="bfloat16"),
                       sampling=SamplingConfig(prompt="a: b # c", negative_prompt=None, frames=17,
                                               guidance=3.5, guidance_2=2.0))
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_yaml(path) == config


def test_precedence_defaults_yaml_flags_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  steps: 7\n  frames: 13\n  seed: 5\n")
    args = parser().parse_args(["generate", "--config", str(path), "--frames", "17", "--seed", "9",
                                "--set", "sampling.seed=11"])
    config = build_config(args)
    assert config.sampling.steps == 7          # YAML over defaults
    assert config.sampling.frames == 17        # flag over YAML
    assert config.sampling.seed == 11          # --set over flag and YAML
    assert config.sampling.guidance is None    # untouched default


def test_set_parses_scalars():
    config = apply_overrides(RunConfig(), ["sampling.guidance=4", "output.decode=false",
                                           "sampling.negative_prompt=null", "sampling.prompt=[red] cat"])
    assert config.sampling.guidance == 4.0 and isinstance(config.sampling.guidance, float)
    assert config.output.decode is False and config.sampling.negative_prompt is None
    assert config.sampling.prompt == "[red] cat"


@pytest.mark.parametrize("data, message", [
    ({"sampling": {"steps": 2.5}}, "sampling.steps: expected int | null, got float"),
    ({"sampling": {"steps": True}}, "sampling.steps: expected int | null, got bool"),
    ({"output": {"decode": "yes"}}, "output.decode: expected bool"),
    ({"model": "wan"}, "model: expected a mapping"),
    ({"model": {"famly": "wan"}}, "unknown config key 'model.famly'; allowed in 'model': family, path"),
])
def test_strict_errors(data, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config_from_dict(data)


def test_configs_are_frozen_and_documented():
    import typing

    hints = typing.get_type_hints(RunConfig)
    # A section that may be null (cache_2) is its class or None: the class is checked.
    sections = {next(a for a in typing.get_args(t) if a is not type(None)) if typing.get_args(t) else t
                for t in hints.values()}
    for section in (RunConfig, *sections):
        # A list section (lora) is checked through its entries' class, built with its required fields.
        required = {f.name: "x" for f in dataclasses.fields(section)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section(**required), dataclasses.fields(section)[0].name, None)
        source = Path(__import__("inspect").getsourcefile(section)).read_text()
        for f in dataclasses.fields(section):
            # every field is followed by its docstring
            assert f'{f.name}:' in source and '"""' in source.split(f"    {f.name}:", 1)[1].split("\n")[1], f.name


def test_every_bundled_config_loads():
    names = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert Path("tiny-wan.yaml") in names and len(names) >= 5
    for name in names:
        load_yaml(ROOT / "configs" / name)


def test_package_dir_lists_every_package():
    """Every folder with an __init__.py is a listed subpackage of `unison` (DESIGN.md, Layout): the
    top-level folders are mapped in package-dir, a folder inside one is named after it (a family
    folder engine/models/wan is unison.engine.models.wan)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {Path(folder): name for name, folder in project["package-dir"].items()}
    skip = {"tests", ".venv", "build", "benchmarks"}
    found = {p.parent.relative_to(ROOT) for p in ROOT.rglob("__init__.py")
             if not (set(p.relative_to(ROOT).parts) & skip) and ".egg-info" not in str(p)
             and not p.relative_to(ROOT).parts[0].startswith(".")}  # .venv-compat, .rehearsal, ...

    def dotted(folder: Path) -> str:
        for parent in (folder, *folder.parents):
            if parent in roots:
                return ".".join([roots[parent], *folder.relative_to(parent).parts])
        raise AssertionError(f"{folder} is in no mapped folder")

    assert {dotted(folder) for folder in found} == set(project["packages"])
    assert set(roots) <= found


def test_cache_section_is_a_kind_and_its_own_fields(tmp_path):
    """The kind picks the config class; fields carry over while the kind stays, a new kind starts
    from its own defaults (verify, common to all, carries over)."""
    from unison.engine.config import CacheConfig

    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  kind: fbcache\n  threshold: 0.2\n  verify: true\n")
    cache = build_config(parser().parse_args(["generate", "--config", str(path),
                                              "--set", "cache.warmup_steps=2"])).cache
    assert (cache.kind, cache.threshold, cache.warmup_steps, cache.verify) == ("fbcache", 0.2, 2, True)
    cache = build_config(parser().parse_args(["generate", "--config", str(path), "--cache", "magcache",
                                              "--set", "cache.mag_ratios=[1.0, 0.9]",
                                              "--set", "cache.threshold=0.1"])).cache
    assert cache == CacheConfig(kind="magcache", mag_ratios=(1.0, 0.9), threshold=0.1, verify=True)
    assert config_from_dict({"cache": "pab"}).cache == CacheConfig(kind="pab")


# ---------------------------------------------------------------------------------------------
# cache_2: Wan 2.2 A14B's low-noise expert's cache.

def test_cache_2_is_read_like_cache_and_starts_from_it(tmp_path):
    """A cache_2 mapping without a kind starts from cache (its kind and fields), in whatever order
    the YAML gives them; --set cache_2.FIELD changes it alone; a kind of its own starts from that
    kind's defaults; null (or absent) means the expert reads cache."""
    from unison.engine.config import CacheConfig

    path = tmp_path / "c.yaml"
    path.write_text("cache_2:\n  warmup_steps: 2\n  max_cached_steps: 20\n"
                    "cache:\n  kind: dbcache\n  threshold: 0.12\n  warmup_steps: 4\n  max_cached_steps: 8\n")
    config = build_config(parser().parse_args(["generate", "--config", str(path), "--set", "cache_2.threshold=0.2",
                                               "--set", "cache.max_consecutive_skips=3"]))
    assert config.cache == CacheConfig(kind="dbcache", threshold=0.12, warmup_steps=4, max_cached_steps=8,
                                       max_consecutive_skips=3)
    assert config.cache_2 == CacheConfig(kind="dbcache", threshold=0.2, warmup_steps=2, max_cached_steps=20)
    assert load_yaml(path, base=None) == dataclasses.replace(
        config, cache=dataclasses.replace(config.cache, max_consecutive_skips=None),
        cache_2=dataclasses.replace(config.cache_2, threshold=0.12))
    # Round trip through the resolved config written beside a video.
    written = tmp_path / "written.yaml"
    written.write_text(dump_yaml(config))
    assert load_yaml(written) == config
    # --set alone, a kind of its own, and null.
    config = apply_overrides(RunConfig(), ["cache.kind=fbcache", "cache_2.kind=magcache",
                                           "cache_2.mag_ratios=[1.0, 0.9]"])
    assert config.cache == CacheConfig(kind="fbcache")
    assert config.cache_2 == CacheConfig(kind="magcache", mag_ratios=(1.0, 0.9))
    assert config_from_dict({"cache_2": None}, base=config).cache_2 is None
    assert RunConfig().cache_2 is None and config_from_dict({"cache": "pab"}).cache_2 is None


@pytest.mark.parametrize("data, message", [
    ({"model": {"family": "wan"}, "cache": "fbcache", "cache_2": {"threshold": 0.1}},
     "cache_2 is the low-noise expert's cache of Wan 2.2 A14B; wan has one transformer, so use cache alone"),
    ({"model": {"family": "hunyuanvideo"}, "cache_2": "fbcache"},
     "cache_2 is the low-noise expert's cache of Wan 2.2 A14B; hunyuanvideo has one transformer"),
    ({"model": {"family": "wan2.2"}, "cache": "fbcache", "cache_2": {"front_blocks": 2}},
     "unknown config key 'cache_2.front_blocks' for cache kind fbcache; allowed in 'fbcache': kind, verify"),
    ({"model": {"family": "wan2.2"}, "cache_2": {"kind": "wan"}}, "cache_2.kind: expected one of none, fbcache"),
    ({"model": {"family": "wan2.2"}, "cache_2": {"kind": "fbcache", "threshold": -1}},
     "cache_2.threshold must be at least 0, got -1"),
    ({"model": {"family": "wan2.2"}, "cache_2": "magcache"},
     "cache_2.mag_ratios must be given: MagCache needs this model's per-step magnitude ratios"),
    ({"model": {"family": "wan2.2"}, "cache_2": 3}, "cache_2: expected a mapping of keys, got int"),
])
def test_cache_2_bad_input_is_one_line_before_anything_loads(data, message):
    from unison.engine.plan import plan_run

    with pytest.raises(UserError, match=re.escape(message)) as err:
        plan_run(config_from_dict(data))
    assert "\n" not in str(err.value)


def test_cache_2_in_batch_jobs_and_the_checkpoint_identity(tmp_path):
    """A batch job's line takes cache_2 as it takes cache; a checkpoint of a run whose cache_2
    differs is another run's, while cache_2 unset or equal to cache is the same run."""
    import json

    from unison.engine.io.checkpoint import fingerprint
    from unison.launch.jobs import parse_line

    base = config_from_dict({"model": {"family": "wan2.2"}, "cache": {"kind": "dbcache", "warmup_steps": 4},
                             "sampling": {"steps": 4}})
    line = json.dumps({"prompt": "a cat", "id": "a", "cache_2": {"warmup_steps": 2, "max_cached_steps": 20}})
    job = parse_line(line, 1, base=base, out_dir=tmp_path, world_size=1)
    assert (job.config.cache.warmup_steps, job.config.cache_2.warmup_steps, job.config.cache_2.max_cached_steps,
            job.config.cache_2.kind) == (4, 2, 20, "dbcache")
    job = parse_line(json.dumps({"prompt": "a cat", "cache_2": "pab"}), 2, base=base, out_dir=tmp_path, world_size=1)
    assert job.config.cache_2.kind == "pab" and job.config.cache.kind == "dbcache"
    with pytest.raises(UserError, match=re.escape("cache_2.warmup_steps must be at least 0")):
        parse_line(json.dumps({"prompt": "a", "cache_2": {"warmup_steps": -1}}), 3, base=base, out_dir=tmp_path,
                   world_size=1)

    same = fingerprint(base, world_size=1)
    assert fingerprint(dataclasses.replace(base, cache_2=base.cache), world_size=1) == same
    assert fingerprint(dataclasses.replace(base, cache_2=dataclasses.replace(base.cache, verify=True)),
                       world_size=1) == same
    other = dataclasses.replace(base, cache_2=dataclasses.replace(base.cache, warmup_steps=2))
    assert fingerprint(other, world_size=1) != same


def test_wan22_dbcache_recipe_sets_each_expert_as_cache_dit_publishes():
    """cache-dit's Wan 2.2 A14B example (cache-facts.md §3.3): high-noise warm-up 4 and at most
    8 cached steps, low-noise warm-up 2 and at most 20; threshold 0.12, Fn 1 / Bn 0 for both."""
    config = load_yaml(ROOT / "configs" / "wan2.2-t2v-a14b" / "dbcache.yaml")
    for cache, (warmup, cached) in ((config.cache, (4, 8)), (config.cache_2, (2, 20))):
        assert (cache.kind, cache.warmup_steps, cache.max_cached_steps) == ("dbcache", warmup, cached)
        assert (cache.threshold, cache.front_blocks, cache.back_blocks) == (0.12, 1, 0)


def test_cache_2_flag_sets_the_low_noise_experts_kind():
    """`--cache fbcache --cache-2 pab` on Wan 2.2 A14B: the config holds both, and a render runs
    First-Block Cache on the high-noise expert and PAB (attention calls) on the low-noise one."""
    from unison.engine.config import CacheConfig, OutputConfig
    from unison.engine.render import Engine

    config = build_config(parser().parse_args(["generate", "--set", "model.family=wan2.2", "--cache", "fbcache",
                                               "--cache-2", "pab", "--steps", "4", "--height", "48"]))
    assert config.cache.kind == "fbcache" and config.cache_2.kind == "pab"
    config = RunConfig(model=config.model, sampling=SamplingConfig(steps=4, height=48, width=64, frames=9),
                       cache=CacheConfig(kind="fbcache", threshold=0.1), cache_2=config.cache_2,
                       output=OutputConfig(decode=False, progress=False))
    result = Engine.from_config(config).render()
    assert {d[2] for d in result.cache_decisions["transformer"]} == {"forward"}
    assert {d[2] for d in result.cache_decisions["transformer_2"]} == {"self", "cross"}
