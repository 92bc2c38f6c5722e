"""Step checkpoints (engine/io/checkpoint.py): a render interrupted after a checkpoint and rendered
again continues from it, runs only the remaining steps and ends bit-identical to an uninterrupted
render, on one rank and on two (Ulysses 2), with no cache, First-Block Cache and Pyramid Attention
Broadcast (mixed skip schedules, which must match too); Wan 2.2's two experts resumed before, at
and after the expert switch; HunyuanVideo with First-Block Cache on one rank and on Ring 2;
PipeFusion, whose buffers are not saved, bit-identical when the resumed step is inside the warm-up
and off by one extra warm-up step otherwise; a checkpoint of another run is never resumed silently;
and every family of the registry resumed on one rank."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

import families
from multirank import run_ranks
from test_caching import PAB, THRESHOLD, _cached
from unison.engine.plan import plan_run
from unison.engine.io.checkpoint import Checkpoints
from unison.engine.targets import checkpoint_folder as checkpoint_dir
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig
from unison.engine.models import SPECS
from unison.engine.render import Engine
from unison.engine.errors import UserError

STEPS, EVERY, STOP = 6, 2, 4
"""6 steps, a checkpoint after steps 2 and 4 (indices 1 and 3); the render stops after index 4,
so the resume runs indices 4 and 5 again: one step lost."""
# Wan's tiny first-block changes at 6 steps: this skips cond at 1, 2, 4 and uncond at 1, 3, 5, so
# skips run across the checkpoint (skips in a row, the previous residual, the tail residual).
FBCACHE = CacheConfig(kind="fbcache", threshold=0.125)
CACHES = {"none": CacheConfig(), "fbcache": FBCACHE, "pab": PAB}
# HunyuanVideo's tiny first block at 6 steps (one rank): skips cond at 1 and uncond at 1, 2, 3, so
# the resume at step 4 follows a run of skips.
HUNYUAN_FBCACHE = CacheConfig(kind="fbcache", threshold=0.3)


class Interrupted(Exception):
    pass


def _stop_after(index: int):
    def on_step(record) -> None:
        if record.index == index:
            raise Interrupted
    return on_step


def _config(folder: Path, cache: CacheConfig, parallel: ParallelConfig = ParallelConfig(), *, family: str = "wan",
            every: int = EVERY, resume: str = "auto", seed: int = 0, decode: bool = False) -> RunConfig:
    config = _cached(family, 48, cache, parallel, steps=STEPS)
    return dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, seed=seed),
        output=dataclasses.replace(config.output, path=str(folder / "video.mp4"), checkpoint_every=every,
                                   resume=resume, decode=decode))


def _interrupt_and_resume(engine: Engine, config: RunConfig, *, stop: int = STOP):
    """Render `config` until step `stop` has run, then again: the resumed result, and the
    forwards of every expert transformer the resumed render ran."""
    with pytest.raises(Interrupted):
        engine.render(config, on_step=_stop_after(stop))
    forwards = []
    hooks = [getattr(engine.pipe, name).register_forward_pre_hook(lambda *_: forwards.append(1))
             for name in engine.plan.spec.experts]
    try:
        result = engine.render(config)
    finally:
        for hook in hooks:
            hook.remove()
    return result, len(forwards)


def _resumed_from(stop: int, every: int) -> int:
    """The step a render interrupted after step `stop` resumes from: the last checkpoint written."""
    return (stop + 1) // every * every


def _check_resumed(result, forwards: int, reference, *, stop: int = STOP, every: int = EVERY) -> None:
    start = _resumed_from(stop, every)
    assert [r.index for r in result.loop.steps] == list(range(start, STEPS))
    assert result.loop.resumed_from_step == start and reference.loop.resumed_from_step is None
    assert forwards == 2 * (STEPS - start)  # cond and uncond per remaining step
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
    # Who writes what: what this rank's file holds (rank 0 alone saves the latents and scheduler).
    layout = _config(Path(folder) / "layout", CACHES["fbcache"], parallel)
    with pytest.raises(Interrupted):
        Engine.from_config(layout, world_size=world).render(on_step=_stop_after(STOP))
    saved = torch.load(checkpoint_dir(layout.output) / f"rank{rank}.step{_resumed_from(STOP, EVERY)}.pt",
                       weights_only=True)
    out["keys"] = sorted(saved)
    # Displaced patches: stale K/V are not saved, so the resumed render's first step exchanges
    # them synchronously (exact) where the uninterrupted one used one-step-stale K/V.
    engine = Engine.from_config(_config(Path(folder) / "patch", CacheConfig(), patch, every=0), world_size=world)
    reference = engine.render()
    result, _ = _interrupt_and_resume(engine, _config(Path(folder) / "patch", CacheConfig(), patch))
    assert [r.index for r in result.loop.steps] == list(range(_resumed_from(STOP, EVERY), STEPS))
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
    # Rank 1 resumed bit-identically above from a file without latents or scheduler state: rank 0
    # read them from its own file and broadcast them.
    common = ["caches", "fingerprint", "format", "rank", "rng", "step", "world_size"]
    assert results[0]["keys"] == sorted(common + ["latents", "scheduler"]) and results[1]["keys"] == common
    for name in (*CACHES, "patch"):  # every rank's files and the folder are gone
        assert not checkpoint_dir(_config(tmp_path / name, CacheConfig()).output).exists()


def test_other_run_is_refused_or_ignored_and_video_clears_the_folder(tmp_path, caplog):
    engine = Engine.from_config(_config(tmp_path, CacheConfig()))
    with pytest.raises(Interrupted):
        engine.render(on_step=_stop_after(STOP))
    folder = checkpoint_dir(engine.plan.config.output)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rank0.step2.pt", "rank0.step4.pt",
                                                        "unison-checkpoints.txt"]

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

    # Someone's file in unison's folder: the render resumes, and removes only its own files.
    kept = _config(tmp_path / "kept", CacheConfig())
    with pytest.raises(Interrupted):
        engine.render(kept, on_step=_stop_after(STOP))
    folder = checkpoint_dir(kept.output)
    (folder / "notes.txt").write_text("mine")
    done = engine.render(dataclasses.replace(kept, output=dataclasses.replace(kept.output, decode=True)))
    assert done.video_path.is_file() and [p.name for p in folder.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="holds files unison did not write"):  # now a folder of someone's
        plan_run(kept)


def test_wan22_resumes_before_at_and_after_the_expert_switch(tmp_path):
    """Wan 2.2's high-noise expert runs steps 0-1, the low-noise one 2-5, each with its own
    First-Block Cache. With a checkpoint after every step, interrupted after step 0, 1 or 2, the
    render resumes before the switch (step 1), at it (step 2) and after it (step 3): the same
    experts run the remaining steps, with the same cache decisions, and the latents are equal."""
    cache = CacheConfig(kind="fbcache", threshold=THRESHOLD["wan2.2"])
    engine = Engine.from_config(_config(tmp_path, CacheConfig(), family="wan2.2", every=0))
    reference = engine.render(_config(tmp_path / "reference", cache, family="wan2.2", every=0))
    experts = [r.expert for r in reference.loop.steps]
    assert experts == ["transformer"] * 2 + ["transformer_2"] * 4
    assert False in [d[-1] for d in reference.cache_decisions["transformer_2"]]  # the low-noise expert skips
    for stop in (0, 1, 2):
        result, forwards = _interrupt_and_resume(engine, _config(tmp_path / f"stop{stop}", cache, family="wan2.2",
                                                                 every=1), stop=stop)
        _check_resumed(result, forwards, reference, stop=stop, every=1)
        assert [r.expert for r in result.loop.steps] == experts[stop + 1:]


def _resume_hunyuan(folder: Path, parallel: ParallelConfig, world: int):
    """HunyuanVideo (true CFG, joint text attention) with First-Block Cache: uninterrupted, then
    interrupted and resumed; checked against each other."""
    engine = Engine.from_config(_config(folder, HUNYUAN_FBCACHE, parallel, family="hunyuanvideo", every=0),
                                world_size=world)
    reference = engine.render()
    flags = [d[-1] for d in reference.cache_decisions["transformer"]]
    assert True in flags and False in flags
    result, forwards = _interrupt_and_resume(engine, _config(folder, HUNYUAN_FBCACHE, parallel,
                                                             family="hunyuanvideo"))
    _check_resumed(result, forwards, reference)
    return result.latents, result.cache_decisions


def test_hunyuanvideo_fbcache_one_rank_resume_is_bit_identical(tmp_path):
    _resume_hunyuan(tmp_path, ParallelConfig(), 1)
    assert not list(tmp_path.glob("*.ckpt"))  # removed once the video is done


PIPEFUSION_WARMUPS = (1, STOP + 1)
"""Warm-up 1: the resumed step 4 is past it. Warm-up 5: step 4 is inside it, step 5 is pipelined."""


def _pipefusion(warmup: int) -> ParallelConfig:
    return ParallelConfig(patch=2, patch_mode="pipefusion", patch_warmup_steps=warmup, timeout_s=60)


def _two_rank_cases(rank, world, folder):
    """HunyuanVideo with First-Block Cache on Ring 2; Wan with PipeFusion on 2 stages for each
    warm-up and with displaced patches resumed inside the warm-up: (uninterrupted, resumed)
    latents, and the resumed render's collective calls."""
    folder = Path(folder)
    out = {"hunyuan": _resume_hunyuan(folder / "hunyuan", ParallelConfig(ring=2, timeout_s=60), world)}
    layouts = {**{warmup: _pipefusion(warmup) for warmup in PIPEFUSION_WARMUPS},
               "displaced": ParallelConfig(patch=2, patch_warmup_steps=STOP + 1, timeout_s=60)}
    for key, parallel in layouts.items():
        sub = folder / str(key)
        engine = Engine.from_config(_config(sub, CacheConfig(), parallel, every=0), world_size=world)
        reference = engine.render()
        result, _ = _interrupt_and_resume(engine, _config(sub, CacheConfig(), parallel))
        assert result.loop.resumed_from_step == _resumed_from(STOP, EVERY)
        out[key] = (reference.latents, result.latents, result.comm_calls)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every two-rank case below in one call of the rank pool; and the folder they rendered in."""
    folder = tmp_path_factory.mktemp("two_ranks")
    return run_ranks(2, _two_rank_cases, str(folder)), folder


def test_hunyuanvideo_fbcache_ring2_resume_is_bit_identical(two_ranks):
    results, folder = two_ranks
    (latents, decisions), (other, other_decisions) = (out["hunyuan"] for out in results)
    assert torch.equal(latents, other) and decisions == other_decisions
    # Once both ranks are done (each removes its own files after the video), no checkpoint is left.
    assert not list((folder / "hunyuan").glob("*.ckpt"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_pipefusion_resume_rewarms_its_buffers(two_ranks, tmp_path):
    """PipeFusion's K/V buffers are not saved: the resumed render's first step (4) passes the
    whole sequence as one patch (stage 0 sends once per branch, not twice), then step 5 is
    pipelined again (two patches per branch): 2 + 4 sends. Inside the warm-up that is what the
    uninterrupted render did, so the result is bit-identical; past it, the resumed render has one
    exact step more than the uninterrupted one and differs by less than the uninterrupted
    render's own approximation error."""
    results, _ = two_ranks
    exact = Engine.from_config(_config(tmp_path, CacheConfig(), every=0)).render().latents
    for rank, out in enumerate(results):
        for warmup in PIPEFUSION_WARMUPS:
            assert out[warmup][2].get("p2p", 0) == (2 + 4 if rank == 0 else 0)  # the last stage sends nothing
        reference, resumed, _ = out[STOP + 1]
        assert torch.equal(resumed, reference)
        reference, resumed, _ = out[1]
        change, approximation = _rel(resumed, reference), _rel(reference, exact)
        print(f"PipeFusion warm-up 1, resumed at step 4: {change:.2e} from the uninterrupted render, "
              f"whose error is {approximation:.2e} (resumed: {_rel(resumed, exact):.2e})")
        assert 0 < change < approximation
    assert torch.equal(results[0][1][1], results[1][1][1])


def test_displaced_patches_resumed_inside_the_warmup_are_bit_identical(two_ranks):
    """Displaced patches, warm-up 5, resumed at step 4: the first resumed step exchanges K/V
    synchronously, as the uninterrupted render did there, so step 5's stale K/V are the same.
    Per branch and layer (3), the synchronous step 4 all-gathers K and V (6 calls), step 5
    starts their asynchronous all-gather for a next step (6); every forward (2 per step) also
    all-gathers the output's sequence shards."""
    results, _ = two_ranks
    for out in results:
        reference, resumed, calls = out["displaced"]
        assert torch.equal(resumed, reference)
        assert calls == {"all_gather": 2 * 3 * 2 + 2 * 2, "all_gather_async": 2 * 3 * 2}


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_family_resumes_bit_identical(tiny_folder, tmp_path, family):
    """The registry's battery: every family (a new one with no edit here), interrupted after a
    checkpoint and rendered again, runs only the remaining steps and ends bit-identical to an
    uninterrupted render of the same engine (two guidance branches, a picture where it needs one)."""
    sampling = families.sampling(family, steps=4, folder=tmp_path)

    def config(folder: Path, every: int) -> RunConfig:
        return RunConfig(model=ModelConfig(path=tiny_folder(family)), sampling=sampling,
                         output=OutputConfig(decode=False, progress=False, path=str(folder / "video.mp4"),
                                             checkpoint_every=every))

    engine = Engine.from_config(config(tmp_path / "reference", 0))
    reference = engine.render()
    result, forwards = _interrupt_and_resume(engine, config(tmp_path / "resumed", 2), stop=2)
    assert [r.index for r in result.loop.steps] == [2, 3] and result.loop.resumed_from_step == 2
    assert forwards == 2 * 2  # cond and uncond on each of the two remaining steps
    assert torch.equal(result.latents, reference.latents)


def test_a_rank_at_its_next_render_sees_the_folder_as_ours_while_another_removes(tmp_path):
    """Rank 1 has removed its checkpoints and checks the folder for its next render while rank 0
    is still removing its own (its step file gone, manifest.json not yet): the folder must still
    read as unison's. (Every rank used to remove the marker with its own files; the folder then
    held manifest.json alone, which no rule recognises, and the next render was refused.)"""
    from unison.engine.io.checkpoint import mark_folder
    from unison.engine.targets import CHECKPOINT_MARKER, check_checkpoint_folder

    folder = tmp_path / "video.mp4.ckpt"
    folder.mkdir()
    mark_folder(folder)
    for name in ("rank0.step3.pt", "rank1.step3.pt", "rank0.window0.pt", "rank1.window0.pt", "manifest.json"):
        (folder / name).write_bytes(b"x")
    ranks = [Checkpoints(folder=folder, every=1, resume="auto", fingerprint="f", rank=r, world_size=2)
             for r in range(2)]
    ranks[1].remove()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CHECKPOINT_MARKER, "rank0.step3.pt", "rank0.window0.pt", "manifest.json"])
    for name in ("rank0.step3.pt", "rank0.window0.pt"):  # rank 0 part-way through its remove()
        (folder / name).unlink()
    check_checkpoint_folder(folder)  # no UserError: still unison's folder
    ranks[0].remove()
    assert not folder.exists()  # the last rank took the marker and the folder
