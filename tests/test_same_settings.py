"""Ranks started one by one with different settings: one line on every rank naming the first
differing field and which ranks hold which value, before anything loads (two gloo ranks)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from multirank import run_ranks
from unison.engine.config import ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.same_settings import first_difference
from unison.engine.errors import UserError

BASE = RunConfig(model=ModelConfig(family="wan"),
                 sampling=SamplingConfig(prompt="a cat", height=32, width=32, frames=5, steps=2,
                                         max_sequence_length=16),
                 parallel=ParallelConfig(ulysses=2, timeout_s=60), output=OutputConfig(decode=False, progress=False))


def _start(rank: int, world: int, configs: list[RunConfig]):
    """Build an engine from this rank's config; the error's text, and whether weights loaded."""
    import unison.engine.load as load
    import unison.engine.render as render
    from unison.engine.plan import plan_run

    loaded = []
    real = load.load_pipeline
    load.load_pipeline = lambda plan: loaded.append(True) or real(plan)
    try:
        render.Engine(plan_run(configs[rank], world_size=world))
        return None, bool(loaded)
    except UserError as err:
        return str(err), bool(loaded)
    finally:
        load.load_pipeline = real


def _picture(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_ranks_with_different_settings_stop_before_loading(tmp_path, tiny_folder):
    wan, i2v = tiny_folder("wan"), tiny_folder("wan-i2v")
    copy = tmp_path / "copy-of-wan"
    shutil.copytree(wan, copy)
    sampling = BASE.sampling
    on_folder = dataclasses.replace(BASE, model=ModelConfig(path=wan))
    i2v_base = dataclasses.replace(BASE, model=ModelConfig(path=i2v), sampling=dataclasses.replace(
        sampling, max_sequence_length=512, image=_picture(tmp_path / "a.png", 1)))
    cases = [  # (rank 0's config, rank 1's, the expected line; None: they agree)
        (BASE, dataclasses.replace(BASE, sampling=dataclasses.replace(sampling, steps=3)),
         "sampling.steps is 2 on rank 0; 3 on rank 1"),
        (BASE, dataclasses.replace(BASE, sampling=dataclasses.replace(sampling, seed=7)),
         "sampling.seed is 0 on rank 0; 7 on rank 1"),
        (BASE, dataclasses.replace(BASE, parallel=ParallelConfig(ring=2, timeout_s=60)),
         "parallel.ulysses is 2 on rank 0; 1 on rank 1"),
        (i2v_base, dataclasses.replace(i2v_base, sampling=dataclasses.replace(
            i2v_base.sampling, image=_picture(tmp_path / "b.png", 2))), "sampling.image_sha256 is "),
        (on_folder, dataclasses.replace(on_folder, model=ModelConfig(path=str(copy))), None),  # a copy elsewhere
    ]
    for first, second, expected in cases:
        replies = run_ranks(2, _start, [first, second])
        if expected is None:
            assert replies == [(None, True), (None, True)]
            continue
        (error, loaded), other = replies
        assert replies[1] == other and error == other[0] and not loaded and not other[1]
        assert error.startswith("the ranks were started with different settings: ") and expected in error, error
        assert "\n" not in error


def test_the_first_differing_field_is_named_with_its_ranks():
    same = {"a": "1", "b": "2"}
    assert first_difference([same, dict(same), dict(same)]) is None
    line = first_difference([same, {"a": "1", "b": "3"}, {"a": "1", "b": "3"}, {"a": "1", "b": "2"}])
    assert line.startswith("the ranks were started with different settings: b is 2 on ranks 0,3; 3 on ranks 1,2;")
