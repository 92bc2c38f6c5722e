"""Step checkpoints (engine/checkpoint.py): a render interrupted after a checkpoint and rendered
again continues from it, runs only the remaining steps and ends bit-identical to an uninterrupted
render, on one rank and on two (Ulysses 2), with no cache, First-Block Cache and Pyramid Attention
Broadcast (mixed skip schedules, which must match too); a checkpoint of another run is never resumed silently."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from multirank import run_ranks
from test_caching import PAB, _cached
from unison.engine.build import plan_run
from unison.engine.checkpoint import Checkpoints, checkpoint_dir
from unison.engine.config import CacheConfig, ParallelConfig, RunConfig
from unison.engine.render import Engine
from unison.errors import UserError

STEPS, EVERY, STOP = 6, 2, 4
"""6 steps, a checkpoint after steps 2 and 4 (indices 1 and 3); the render stops after index 4,
so the resume runs indices 4 and 5 again: one step lost."""
# Wan's tiny first-block changes at 6 steps: this skips cond at 1, 2, 4 and uncond at 1, 3, 5, so
# skips run across the checkpoint (skips in a row, the previous residual, the tail residual).
FBCACHE = CacheConfig(kind="fbcache", threshold=0.125)
CACHES = {"none": CacheConfig(), "fbcache": FBCACHE, "pab": PAB}


class Interrupted(Exception):
    pass


def _stop_after(index: int):
    def on_step(record) -> None:
        if record.index == index:
            raise Interrupted
    return on_step


def _config(folder: Path, cache: CacheConfig, parallel: ParallelConfig = ParallelConfig(), *,
            every: int = EVERY, resume: str = "auto", seed: int = 0, decode: bool = False) -> RunConfig:
    config = _cached("wan", 48, cache, parallel, steps=STEPS)
    return dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, seed=seed),
        output=dataclasses.replace(config.output, path=str(folder / "video.mp4"), checkpoint_every=every,
                                   resume=resume, decode=decode))


def _interrupt_and_resume(engine: Engine, config: RunConfig):
    """Render `config` until the step after a checkpoint, then again: the resumed result, and the
    transformer forwards the resumed render ran."""
    with pytest.raises(Interrupted):
        engine.render(config, on_step=_stop_after(STOP))
    forwards = []
    hook = engine.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        result = engine.render(config)
    finally:
        hook.remove()
    return result, len(forwards)


def _check_resumed(result, forwards: int, reference) -> None:
    assert [r.index for r in result.loop.steps] == list(range(STOP - STOP % EVERY, STEPS))
    assert result.loop.resumed_from_step == STOP - STOP % EVERY and reference.loop.resumed_from_step is None
    assert forwards == 2 * (STEPS - STOP + STOP % EVERY)  # cond and uncond per remaining step
    assert torch.equal(result.latents, reference.latents)
    assert result.cache_decisions == reference.cache_decisions


def _resume_every_cache(folder: Path, parallel: ParallelConfig, world: int) -> dict:
    """For each cache: an uninterrupted render (no checkpoints), then one interrupted and resumed;
    checked against each other. One engine for all (a render may change the cache)."""
    engine = Engine.from_config(_config(folder, CacheConfig(), parallel, every=0), world_size=world)
    out = {}
    for name, cache in CACHES.items():
        reference = engine.render(_config(folder / name, cache, parallel, every=0))
        if name != "none":
            flags = [d[-1] for d in reference.cache_decisions["transformer"]]
            assert True in flags and False in flags
        result, forwards = _interrupt_and_resume(engine, _config(folder / name, cache, parallel))
        _check_resumed(result, forwards, reference)
        out[name] = (result.latents, result.cache_decisions)
    return out


def test_one_rank_resume_is_bit_identical(tmp_path):
    _resume_every_cache(tmp_path, ParallelConfig(), 1)
    for name in CACHES:
        assert not checkpoint_dir(_config(tmp_path / name, CACHES[name]).output).exists()


def _ranks(rank, world, folder, parallel, patch):
    out = _resume_every_cache(Path(folder), parallel, world)
    # Displaced patches: stale K/V are not saved, so the resumed render's first step exchanges
    # them synchronously (exact) where the uninterrupted one used one-step-stale K/V.
    engine = Engine.from_config(_config(Path(folder) / "patch", CacheConfig(), patch, every=0), world_size=world)
    reference = engine.render()
    result, _ = _interrupt_and_resume(engine, _config(Path(folder) / "patch", CacheConfig(), patch))
    assert [r.index for r in result.loop.steps] == list(range(STOP - STOP % EVERY, STEPS))
    out["patch"] = ((result.latents - reference.latents).norm() / reference.latents.norm()).item()
    return out


def test_two_ranks_resume_is_bit_identical_and_displaced_patches_rewarm(tmp_path):
    results = run_ranks(2, _ranks, str(tmp_path), ParallelConfig(ulysses=2, timeout_s=60),
                        ParallelConfig(patch=2, patch_warmup_steps=1, timeout_s=60))
    print("displaced patches, resumed vs uninterrupted: relative error", results[0]["patch"])
    assert 0 < results[0]["patch"] < 0.05  # differs (a warm-up step more), but only by that
    for name in CACHES:
        assert torch.equal(results[0][name][0], results[1][name][0])
        assert results[0][name][1] == results[1][name][1]
    for name in (*CACHES, "patch"):  # every rank's files and the folder are gone
        assert not checkpoint_dir(_config(tmp_path / name, CacheConfig()).output).exists()


def test_other_run_is_refused_or_ignored_and_video_clears_the_folder(tmp_path, caplog):
    engine = Engine.from_config(_config(tmp_path, CacheConfig()))
    with pytest.raises(Interrupted):
        engine.render(on_step=_stop_after(STOP))
    folder = checkpoint_dir(engine.plan.config.output)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rank0.step2.pt", "rank0.step4.pt"]

    other = _config(tmp_path, CacheConfig(), seed=1, resume="require")  # another seed: another run
    with pytest.raises(UserError, match="output.resume=require: .*different run"):
        engine.render(other)
    with caplog.at_level(logging.WARNING, logger="unison"):
        ignored = engine.render(dataclasses.replace(other, output=dataclasses.replace(
            other.output, resume="auto", decode=True)))
    assert [r for r in caplog.records if "not resuming" in r.getMessage()]
    assert len(ignored.loop.steps) == STEPS
    assert torch.equal(ignored.latents, engine.render(_config(tmp_path / "fresh", CacheConfig(), seed=1)).latents)
    assert ignored.video_path.is_file() and not folder.exists()

    with pytest.raises(UserError, match="no checkpoint"):  # require with nothing to resume from
        engine.render(_config(tmp_path, CacheConfig(), resume="require"))
    with pytest.raises(UserError, match="checkpoint_every must be at least 0"):  # before any heavy work
        plan_run(_config(tmp_path, CacheConfig(), every=-1))
    # Removing is safe when another rank has already removed the folder.
    Checkpoints.create(_config(tmp_path / "gone", CacheConfig()), rank=1, world_size=2, group=None).remove()
