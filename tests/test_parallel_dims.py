"""Topology: degrees validated with errors naming every factor; ulysses contiguous; dry run prints the mesh."""

from __future__ import annotations

import pytest

from unison.engine.plan import plan_run
from unison.engine.config import ModelConfig, ParallelConfig, RunConfig
from unison.engine.models import SPECS
from unison.engine.errors import UserError
from unison.launch.cli import main
from unison.parallel.attention import check_heads
from unison.parallel.dims import ParallelDims


def test_ulysses_contiguous_ring_and_cfg_stride():
    dims = ParallelDims(cfg=2, ring=2, ulysses=2, world_size=8)
    assert dims.group_ranks(("ulysses",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.group_ranks(("ring",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.group_ranks(("cfg",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.group_ranks(("ring", "ulysses")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.coords(6) == {"cfg": 1, "patch": 0, "ring": 1, "ulysses": 0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(ulysses=2, ring=2, world_size=8), "ulysses 2 x ring 2 x cfg 1 x patch 1 = 4 must equal the world size 8"),
    (dict(cfg=3, world_size=3), "parallel.cfg must be 1 or 2"),
    (dict(ring=0, world_size=1), "parallel.ring must be at least 1"),
])
def test_bad_degrees(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_tiny_heads_match_the_built_model(family):
    spec = SPECS[family]
    pipe = spec.build_tiny(0)
    assert [getattr(pipe, name).config.num_attention_heads for name in spec.experts] == (
        [spec.tiny_heads] * len(spec.experts))


def test_plan_checks_heads_before_loading(tiny_folder):
    """The Ulysses degree is checked against the folder's config.json (and the tiny preset's
    heads) when the run is planned, before any weight is read."""
    folder = tiny_folder("hunyuanvideo")
    for model in (ModelConfig(path=folder), ModelConfig(family="wan")):
        config = RunConfig(model=model, parallel=ParallelConfig(ulysses=3))
        with pytest.raises(UserError, match="Ulysses degree 3 does not divide the model's 4 attention heads; "
                                            "valid Ulysses degrees: 1, 2, 4"):
            plan_run(config, world_size=3)
        # Ring splits the tokens, not the heads: ring 3 is planned as given.
        plan = plan_run(RunConfig(model=model, parallel=ParallelConfig(ring=3)), world_size=3)
        p = plan.config.parallel
        assert (p.ulysses, p.ring, p.cfg, p.patch, plan.world_size) == (1, 3, 1, 1, 3)
        assert "parallel   ulysses 1 x ring 3 x cfg 1 x patch 1" in plan.describe()
        # And every Ulysses degree the message calls valid is planned.
        for degree in (1, 2, 4):
            plan = plan_run(RunConfig(model=model, parallel=ParallelConfig(ulysses=degree)), world_size=degree)
            assert (plan.config.parallel.ulysses, plan.world_size) == (degree, degree)


def test_heads_not_divisible_names_valid_degrees():
    with pytest.raises(UserError, match="valid Ulysses degrees: 1, 2, 3, 4, 6, 12"):
        check_heads(12, 5)
    check_heads(12, 4)


def test_dry_run_under_torchrun_prints_the_mesh(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--dry-run", "--ulysses", "2", "--cfg-parallel", "--output", str(tmp_path / "a.mp4")]) == 0
    out = capsys.readouterr().out
    assert "ulysses  groups [0, 1] [2, 3]" in out and "cfg      groups [0, 2] [1, 3]" in out


@pytest.mark.parametrize("world, argv, message", [
    ("4", ["--ulysses", "2"], "must equal the world size 4"),
    ("4", ["--cfg-parallel", "--ulysses", "2", "--guidance", "1"], "CFG parallel needs classifier-free guidance"),
    ("2", ["--cfg-parallel", "--set", "model.family=hunyuanvideo"], "uses embedded guidance"),
    ("3", ["--ulysses", "3", "--set", "model.family=hunyuanvideo"], "valid Ulysses degrees: 1, 2, 4"),
])
def test_bad_parallel_requests(monkeypatch, capsys, world, argv, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(["--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err
