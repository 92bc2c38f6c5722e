"""Configs: strict loading, round trip, precedence."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from unison.engine.config import (ModelConfig, RunConfig, SamplingConfig, apply_overrides, config_from_dict,
                                  dump_yaml, load_yaml)
from unison.errors import UserError
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

    for section in (RunConfig, *[typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)]):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section(), dataclasses.fields(section)[0].name, None)
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
    """Every folder with an __init__.py is a listed subpackage of `unison` (DESIGN.md, Layout)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {Path(folder) for folder in project["package-dir"].values()}
    skip = {"tests", ".venv", "build", "benchmarks"}
    found = {p.parent.relative_to(ROOT) for p in ROOT.rglob("__init__.py")
             if not (set(p.relative_to(ROOT).parts) & skip) and ".egg-info" not in str(p)}
    assert found == mapped
    assert set(project["packages"]) == set(project["package-dir"])


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
