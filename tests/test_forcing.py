"""Diffusion forcing (SkyReels-V2 DF, engine/windows.py): parity with diffusers' DF pipelines on
one and several windows, synchronous and asynchronous, with and without noised history; the
window settings' one-line errors before loading; per-window progress."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch

import families
from unison.engine.config import ModelConfig, OutputConfig, RunConfig
from unison.engine.errors import UserError
from unison.engine.models import SPECS
from unison.engine.plan import plan_run
from unison.engine.render import Engine
from unison.engine.windows import Windows, rows

# (id, family, sampling overrides). Tiny latent frames are (frames - 1) / 4 + 1: 17 frames in 9-frame
# windows with a 5-frame overlap is 5 latent frames in 3 windows of 3 (2 given, 1 new); 33 frames in
# 21-frame windows with a 9-frame overlap is 9 latent frames in 2 windows of 6 (3 given, 3 new).
CASES = [
    ("t2v-one-window", "skyreels-v2-df", dict(frames=9)),
    ("t2v-sync-3-windows-addnoise", "skyreels-v2-df", dict(frames=17, window_frames=9, overlap_frames=5,
                                                           addnoise_condition=20)),
    ("t2v-async-frame-wise", "skyreels-v2-df", dict(frames=9, ar_step=1)),
    ("t2v-async-blocks-2-windows", "skyreels-v2-df", dict(frames=33, window_frames=21, overlap_frames=9,
                                                          ar_step=2, causal_block_size=3, addnoise_condition=20)),
    ("t2v-fps-16", "skyreels-v2-df", dict(frames=9, fps=16)),
    ("i2v-sync-3-windows-addnoise", "skyreels-v2-df-i2v", dict(frames=17, window_frames=9, overlap_frames=5,
                                                               addnoise_condition=20)),
    ("i2v-async-blocks-2-windows", "skyreels-v2-df-i2v", dict(frames=33, window_frames=21, overlap_frames=9,
                                                              ar_step=2, causal_block_size=3)),
]


@pytest.fixture(scope="module")
def engines(tiny_folder, tmp_path_factory):
    """One engine per family, shared by its cases (each render sets its own causal block)."""
    made, folder = {}, tmp_path_factory.mktemp("forcing")

    def get(family: str) -> Engine:
        if family not in made:
            sampling = families.sampling(family, steps=3, folder=folder)
            made[family] = Engine.from_config(_config(tiny_folder(family), sampling))
        return made[family]

    return get


def _config(folder: str, sampling, out: Path | None = None) -> RunConfig:
    """Latents only; checkpoints (and the windows they keep) under `out` (default: a folder of this
    config's own; ranks of one render must be given the same)."""
    out = Path(out or tempfile.mkdtemp(prefix="forcing-")) / "video.mp4"
    return RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                     output=OutputConfig(decode=False, progress=False, path=str(out)))


@pytest.mark.parametrize("family, overrides", [pytest.param(f, o, id=i) for i, f, o in CASES])
def test_matches_diffusers(engines, tiny_folder, tmp_path, family, overrides):
    """The final latents of the whole video equal diffusers' DF pipeline's (float32, 1e-5), the
    case's windows and rows counted independently of the engine (diffusers' own arithmetic)."""
    sampling = families.sampling(family, steps=3, folder=tmp_path, **overrides)
    engine = engines(family)
    result = engine.render(_config(tiny_folder(family), sampling))
    theirs = families.run(families.pipeline(family, tiny_folder(family)), family, sampling)
    assert result.latents.shape == theirs.shape
    rel = ((result.latents.double() - theirs.double()).norm() / theirs.double().norm()).item()
    assert rel <= 1e-5
    windows = {record.index for record in result.loop.steps}
    assert len(windows) == len(result.loop.steps)  # one record per forward row, none twice


def test_window_arithmetic_matches_diffusers():
    """Windows.count and sizes against a hand count for the README's examples (latent frames
    (frames-1)/4+1): 257 frames in 97-frame windows, 17 overlap -> 65 latent in windows of 25, the
    first adding 25 and each later one 20: 3 windows; 737 -> 185 latent: 1 + 160/20 = 9 windows."""
    s = families.sampling("skyreels-v2-df", steps=3)
    w = Windows.of(dataclasses.replace(s, frames=257, window_frames=97, overlap_frames=17), temporal=4, block=1)
    assert (w.count, [w.size(k) for k in range(w.count)], [w.new(k) for k in range(w.count)]) == \
        (3, [25, 25, 25], [25, 20, 20])
    w = Windows.of(dataclasses.replace(s, frames=737, window_frames=97, overlap_frames=17), temporal=4, block=5)
    assert w.count == 9 and sum(w.new(k) for k in range(w.count)) == 185
    # Synchronous rows are the steps; asynchronous ones more: 5 blocks of 5 frames, each 5 steps
    # behind the one before, 30 steps: the last block starts after 4 x 5 rows and takes 30.
    hooks = SPECS["skyreels-v2-df"].hooks
    sync = rows(dataclasses.replace(s, frames=97, window_frames=97, steps=30, causal_block_size=1), hooks, temporal=4)
    lagged = rows(dataclasses.replace(s, frames=97, window_frames=97, steps=30, ar_step=5, causal_block_size=5), hooks,
                  temporal=4)
    assert sync == [30] and lagged == [30 + 4 * 5]


def test_causal_block_is_set_per_render(engines, tiny_folder, tmp_path):
    """diffusers' _set_ar_attention changes the transformer's config for good: a render that
    leaves the block unset takes the checkpoint's again, not the last render's."""
    engine = engines("skyreels-v2-df")
    folder = tiny_folder("skyreels-v2-df")
    plain = families.sampling("skyreels-v2-df", steps=2, frames=9)
    first = engine.render(_config(folder, plain)).latents
    engine.render(_config(folder, dataclasses.replace(plain, frames=25, window_frames=25, ar_step=1, causal_block_size=7)))
    again = engine.render(_config(folder, plain)).latents
    assert torch.equal(first, again)
    assert engine.pipe.transformer.config.num_frame_per_block == 1


BAD = [
    (dict(frames=17, window_frames=9), "sampling.overlap_frames is required when sampling.frames (17) exceeds "
                                       "sampling.window_frames (9)"),
    (dict(frames=17, window_frames=9, overlap_frames=9), "must be fewer than sampling.window_frames"),
    (dict(frames=17, window_frames=10, overlap_frames=5), "sampling.window_frames must be 4k+1 frames, got 10"),
    (dict(frames=17, window_frames=9, overlap_frames=6), "sampling.overlap_frames must be 4k+1 frames, got 6"),
    (dict(frames=9, causal_block_size=2), "window 1 of 1 has 3 latent frames, not a multiple of "
                                          "sampling.causal_block_size 2"),
    (dict(frames=9, ar_step=-1), "sampling.ar_step must be at least 0"),
    (dict(frames=9, causal_block_size=0), "sampling.causal_block_size must be at least 1"),
    (dict(frames=9, addnoise_condition=1001), "sampling.addnoise_condition must be between 0 and 1000"),
    (dict(frames=2001, window_frames=2001), "sampling.window_frames=2001 runs past the position table"),
    (dict(frames=2001, window_frames=97, overlap_frames=17, max_sequence_length=16), None),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[(m or "accepted")[:40] for _, m in BAD])
def test_bad_window_settings_are_refused_before_loading(overrides, message):
    """Each a one-line UserError from the plan (no weights read); None: the same video in windows
    the position table takes is accepted (a long video is limited by its window, not its length)."""
    sampling = families.sampling("skyreels-v2-df", steps=3, **overrides)
    config = RunConfig(model=ModelConfig(family="skyreels-v2-df"), sampling=sampling)
    if message is None:
        assert plan_run(config).config.sampling.window_frames == overrides["window_frames"]
        return
    with pytest.raises(UserError) as err:
        plan_run(config)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("window_frames", 9), ("overlap_frames", 5), ("addnoise_condition", 20.0),
                                          ("ar_step", 1), ("causal_block_size", 1), ("fps", 16)])
def test_forcing_fields_refused_elsewhere(field, value):
    sampling = dataclasses.replace(families.sampling("wan", steps=2), **{field: value})
    with pytest.raises(UserError, match=f"sampling.{field} is for diffusion forcing"):
        plan_run(RunConfig(model=ModelConfig(family="wan"), sampling=sampling))


# -- N ranks -------------------------------------------------------------------------------------
def _parallel_config(folder: str, layout: dict, out: Path | None = None, **overrides) -> RunConfig:
    """48 x 80 pixels: 3 x 5 patches per latent frame, 45 tokens per 3-frame window (no degree
    divides it); 17 frames in three windows with noised history, CFG on."""
    from unison.engine.config import ParallelConfig

    values = dict(frames=17, window_frames=9, overlap_frames=5, addnoise_condition=20, height=48, width=80)
    sampling = families.sampling("skyreels-v2-df", steps=3, **{**values, **overrides})
    return dataclasses.replace(_config(folder, sampling, out), parallel=ParallelConfig(**layout, timeout_s=60))


def _render_parallel(rank, world, folder, layout, overrides, out):
    return Engine.from_config(_parallel_config(folder, layout, out, **overrides), world_size=world).render().latents


PARALLEL = [(dict(ulysses=2), {}), (dict(ring=2, shard_weights=True), {}), (dict(ulysses=2, ring=2), {}),
            (dict(cfg=2, shard_weights=True), {}), (dict(patch=2), {}), (dict(patch=2, patch_mode="pipefusion"), {}),
            (dict(ulysses=2), dict(ar_step=1))] + [
    (layout, dict(frames=33, window_frames=21, overlap_frames=9, ar_step=2, causal_block_size=3))
    for layout in (dict(cfg=2), dict(ulysses=2, shard_weights=True), dict(ulysses=4), dict(ring=4),
                   dict(ulysses=2, ring=2), dict(patch=2, patch_warmup_steps=8),
                   dict(patch=2, patch_mode="pipefusion", patch_warmup_steps=8))]
"""Patch modes run each window's 3 rows inside their exact warm-up (4 steps, re-warmed per window).
The block-causal cases (6-frame windows, 3-frame blocks: 2 blocks of 45 tokens, 90 per window)
run under CFG parallel, which leaves attention whole; under Ulysses 2 and 4 (4: padded to 92),
whose attention runs block by block over key prefixes where one rank applies diffusers' mask; and
under Ring 4 (chunks of 23: blocks cut across chunks, the last chunk padded) and USP 2 x 2, whose
queries take each passing chunk's keys before their block's end; and under displaced patches and
PipeFusion inside their warm-up (8 steps over a window's 5 rows), whose patch queries take the
buffer's keys before their block's end."""


@pytest.mark.parametrize("layout, overrides", PARALLEL, ids=lambda v: "-".join(
    f"{k}{'' if v is True else v}" for k, v in v.items()) or "sync")
def test_n_ranks_equal_one_rank(tiny_folder, tmp_path, layout, overrides):
    """Every exact mode on a three-window video (two for the block-causal case): N ranks give the
    one-rank latents (float32, 1e-5 relative)."""
    from multirank import run_ranks

    folder = tiny_folder("skyreels-v2-df")
    one = Engine.from_config(_parallel_config(folder, {}, **overrides)).render().latents
    world = layout.get("ulysses", 1) * layout.get("ring", 1) * layout.get("cfg", 1) * layout.get("patch", 1)
    for latents in run_ranks(world, _render_parallel, folder, layout, overrides, tmp_path):
        assert latents.shape == one.shape
        assert ((latents - one).norm() / one.norm()).item() <= 1e-5


@pytest.mark.parametrize("layout", [dict(ulysses=2, attention_backend="xfuser")])
def test_block_causal_mask_under_xfuser_is_refused_at_plan_time(tiny_folder, layout):
    config = _parallel_config(tiny_folder("skyreels-v2-df"), layout, frames=33, window_frames=21,
                              overlap_frames=9, ar_step=2, causal_block_size=3)
    with pytest.raises(UserError, match="block-causal mask on every self-attention, which the xfuser backend does "
                                        "not take") as err:
        plan_run(config, world_size=2)
    assert "\n" not in str(err.value)


# -- resumable by window ---------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def _resume_config(folder: str, out, *, every: int, **layout) -> RunConfig:
    """Three windows of 3 rows (17 frames, 9-frame windows, 5 overlap, noised history), CFG on."""
    config = _parallel_config(folder, layout, out)
    return dataclasses.replace(config, output=dataclasses.replace(config.output, checkpoint_every=every))


@pytest.mark.parametrize("stop", [1, 2, 3, 7])
def test_a_crash_resumes_at_its_window_and_row_bit_identically(tiny_folder, tmp_path, stop):
    """Killed after row `stop` (global; rows 0-2 are window 1, 3-5 window 2, 6-8 window 3) and its
    checkpoint (one every row): the rerun runs only the rows after it, never a finished window (their
    latents are read back), and its latents equal an uninterrupted render's bitwise. Stop 2 is a
    window's last row (that window is stored by the rerun), stop 3 a window's first."""
    folder = tiny_folder("skyreels-v2-df")
    engine = Engine.from_config(_resume_config(folder, tmp_path / "reference", every=0))
    reference = engine.render()
    config = _resume_config(folder, tmp_path / "resumed", every=1)

    def crash(record):
        if record.index == stop:
            raise Interrupted

    with pytest.raises(Interrupted):
        engine.render(config, on_step=crash)
    ckpt = tmp_path / "resumed" / "video.mp4.ckpt"
    assert sorted(p.name for p in ckpt.glob("rank0.window*.pt")) == [f"rank0.window{k}.pt" for k in range(stop // 3)]
    forwards = []
    hook = engine.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        result = engine.render(config)
    finally:
        hook.remove()
    assert [r.index for r in result.loop.steps] == list(range(stop + 1, 9))
    assert forwards == [1] * 2 * (8 - stop)  # cond and uncond per remaining row
    assert result.loop.windows.resumed_window == stop // 3
    assert torch.equal(result.latents, reference.latents)
    assert not ckpt.exists()


def _preempt_ulysses(rank, world, folder, out, at):
    from unison.engine.errors import Preempted

    engine = Engine.from_config(_resume_config(folder, out, every=0, ulysses=2), world_size=world)

    def signal(record):  # what SIGTERM does, on rank 1 only: every rank stops at the same row
        if rank == 1 and record.index == at:
            engine.request_stop()

    try:
        engine.render(on_step=signal)
        return None
    except Preempted as stopped:
        step = stopped.step
    result = engine.render()
    return step, result.loop.resumed_from_step, result.loop.windows.resumed_window, result.latents


def test_preemption_under_ulysses_resumes_bit_identically(tiny_folder, tmp_path):
    """Ulysses 2, a stop requested on rank 1 alone mid-window 2: both ranks checkpoint at the same
    row (checkpoint_every 0: the stop writes one), and the same engine's rerun continues there and
    equals an uninterrupted two-rank render bitwise."""
    from multirank import run_ranks

    folder = tiny_folder("skyreels-v2-df")
    reference = run_ranks(2, _render_parallel, folder, dict(ulysses=2), {}, tmp_path / "reference")
    outcomes = run_ranks(2, _preempt_ulysses, folder, tmp_path, 4)
    steps = {o[0] for o in outcomes}
    assert len(steps) == 1 and 4 < steps.pop() < 9  # agreed on one row after the request
    for (step, resumed, window, latents), theirs in zip(outcomes, reference):
        assert resumed == step and window == (step - 1) // 3
        assert torch.equal(latents, theirs)
    assert not (tmp_path / "video.mp4.ckpt").exists()


def test_progress_names_the_window_and_the_whole_video(tiny_folder, tmp_path, capsys):
    """A worker's progress lines say the window and the step over the whole video (rows counted
    here from diffusers' step matrix, not the engine's); rank 0's stderr has one line per window
    after the first with the windows' seconds and an ETA; the summary lists each window's time."""
    from unison.engine.worker import Job, Worker

    config = _resume_config(tiny_folder("skyreels-v2-df"), tmp_path, every=0)
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, progress=True))
    worker = Worker.from_config(config)
    seen = []
    outcome = worker.run(Job(id="long", line=1, config=worker.engine.plan.config),
                         on_progress=lambda p: seen.append(p.describe()), progress=True)
    steps = [line for line in seen if "step" in line]
    assert steps == [f"job long, window {row // 3 + 1}/3, step {row + 1}/9" for row in range(9)]
    err = capsys.readouterr().err
    assert err.count("unison: window ") == 2 and "unison: window 3/3; the last 2 took" in err and " to go" in err
    assert "windows   3, " in outcome.summary and " s each" in outcome.summary


# -- caches, in lockstep, per window ---------------------------------------------------------------
def _cache_config(folder: str, cache, layout: dict, out, **overrides) -> RunConfig:
    """The parallel case at 4 steps (the cache battery's tuned mixed settings are for 4 steps)."""
    config = _parallel_config(folder, layout, out, **overrides)
    config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, steps=4))
    return dataclasses.replace(config, cache=cache)


def _render_every_kind(rank, world, folder, layout, overrides, out):
    """Every kind on one engine (caches are applied per render): per kind, latents and decisions."""
    engine, results = None, {}
    for name, cache in _kinds():
        config = _cache_config(folder, cache, layout, out, **overrides)
        engine = engine or Engine.from_config(config, world_size=world)
        result = engine.render(config)
        results[name] = (result.latents, result.loop.windows.decisions)
    return results


def _kinds():
    from test_cache_battery import SETTINGS

    from unison.caching import registry

    return [(name, dataclasses.replace(SETTINGS[name].mixed["wan"], verify=True)) for name in registry.KINDS]


@pytest.mark.parametrize("overrides, rows", [({}, [4, 4, 4]), (dict(ar_step=1), [6, 4, 4])], ids=["sync", "async"])
def test_every_cache_kind_decides_per_window_as_one_rank(tiny_folder, tmp_path, overrides, rows):
    """Every kind of the registry (its battery's mixed setting, verify on) on a three-window video:
    each window starts afresh (a window is a new video to a cache: its first forward computes, its
    decisions count from row 0), and Ulysses 2 takes the one-rank decisions window by window and
    reaches the one-rank latents (1e-5). Asynchronous rows are steps to a cache like any other:
    ar_step 1 over 3 frames and 4 steps is 4 + 2 rows in the first window, and 4 in the later ones,
    whose first two frames are given (only the third is denoised)."""
    from multirank import run_ranks

    folder = tiny_folder("skyreels-v2-df")
    one = _render_every_kind(0, 1, folder, {}, overrides, tmp_path / "one")
    skipped = 0
    for name, (_, decisions) in one.items():
        windows = decisions["transformer"]
        assert [1 + max(d[0] for d in log) for log in windows] == rows, name
        for log in windows:
            assert min(d[0] for d in log) == 0 and all(d[-1] for d in log if d[0] == 0), name
        skipped += sum(not d[-1] for log in windows for d in log)
    assert skipped > 0
    for theirs in run_ranks(2, _render_every_kind, folder, dict(ulysses=2), overrides, tmp_path / "two"):
        for name, (latents, decisions) in theirs.items():
            assert decisions == one[name][1], name
            assert ((latents - one[name][0]).norm() / one[name][0].norm()).item() <= 1e-5, name


# -- memory flat in length; the written frames are a whole decode's ------------------------------------
def test_eight_windows_peak_within_ten_percent_of_two():
    """Peak host memory (a fresh process each, glibc's mmap threshold fixed so that RSS counts what
    is held: benchmarks/forcing_memory.py): 101 frames in 8 windows within 10% of 29 frames in 2.
    Decoding those latents whole grows by more than that there (the benchmark's contrast column),
    so a render that held the video would fail this bound."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from forcing_memory import measure_all

    two, eight = measure_all([2, 8])
    assert (two["windows"], eight["windows"], eight["frames"]) == (2, 8, 101)
    assert eight["peak_rss"] <= 1.10 * two["peak_rss"], (two, eight)


def test_the_streamed_video_is_a_whole_decode_frame_for_frame(tiny_folder, tmp_path, monkeypatch):
    """The frames handed to the encoder, window by window, equal diffusers' whole-video decode of
    the saved latents (AutoencoderKLWan.decode, postprocessed as diffusers does) bitwise; the mp4
    decodes back to the video's frame count and size."""
    import numpy as np

    from unison.engine.io import video as video_io

    sent = []
    real = video_io.encode_mp4

    def spy(path, frames, **kwargs):
        def chunks():
            for chunk in frames:
                sent.append(chunk.copy())
                yield chunk
        return real(path, chunks(), **kwargs)

    monkeypatch.setattr(video_io, "encode_mp4", spy)
    config = _resume_config(tiny_folder("skyreels-v2-df"), tmp_path, every=0)
    config = dataclasses.replace(config, output=dataclasses.replace(
        config.output, decode=True, save_latents=str(tmp_path / "latents.pt")))
    engine = Engine.from_config(config)
    engine.render()
    assert [len(chunk) for chunk in sent] == [9, 4, 4]  # the first window's 3 latent frames, then 1 each
    latents = torch.load(tmp_path / "latents.pt")
    vae = engine.pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = vae.decode(latents / std + mean, return_dict=False)[0]
    frames = engine.pipe.video_processor.postprocess_video(whole, output_type="np")[0]
    expected = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(np.concatenate(sent), expected)
    video_io.check_mp4(tmp_path / "video.mp4", frames=17, height=48, width=80)


# -- extending a video (diffusers' video-to-video pipeline) -------------------------------------------
def _given_video(folder: Path, frames: int = 21) -> Path:
    """A smooth random 80 x 48 video of `frames` frames, written once per folder."""
    import numpy as np
    from PIL import Image

    from unison.engine.io.video import write_mp4

    path = folder / f"given-{frames}.mp4"
    if not path.exists():
        low = np.random.default_rng(5).uniform(0, 255, size=(frames, 4, 5, 3)).astype(np.uint8)
        write_mp4(path, np.stack([np.array(Image.fromarray(f).resize((80, 48), Image.BILINEAR)) for f in low]), fps=24)
    return path


@pytest.mark.parametrize("overrides", [dict(frames=17, window_frames=9, overlap_frames=5, addnoise_condition=20),
                                       dict(frames=29, window_frames=21, overlap_frames=13, ar_step=2,
                                            causal_block_size=3)], ids=["sync-3-windows", "async-blocks"])
def test_extend_matches_diffusers_video_to_video(tiny_folder, tmp_path, overrides):
    """--extend equals SkyReelsV2DiffusionForcingVideoToVideoPipeline given the same video's frames
    (decoded by the same ffmpeg): the latents of every window (1e-5), the size taken from the video.
    With 13 overlap frames (4 latent) and 3-frame blocks the given latents are cut to 3."""
    from diffusers import SkyReelsV2DiffusionForcingVideoToVideoPipeline
    from PIL import Image

    from unison.engine.io.video import video_frames

    given = _given_video(tmp_path)
    folder = tiny_folder("skyreels-v2-df")
    sampling = families.sampling("skyreels-v2-df", steps=3, extend=str(given), height=None, width=None, **overrides)
    result = Engine.from_config(_config(folder, sampling)).render()
    s = result.config.sampling
    assert (s.height, s.width) == (48, 80)
    pipe = SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(s.seed)
    theirs = pipe(video=[Image.fromarray(f) for f in video_frames(given)], prompt=s.prompt,
                  negative_prompt=s.negative_prompt, height=48, width=80, num_frames=s.frames, num_inference_steps=3,
                  guidance_scale=s.guidance, max_sequence_length=s.max_sequence_length,
                  overlap_history=s.overlap_frames, base_num_frames=s.window_frames, ar_step=s.ar_step,
                  causal_block_size=s.causal_block_size, addnoise_condition=s.addnoise_condition, fps=24,
                  generator=torch.Generator().manual_seed(s.seed), output_type="latent").frames
    assert result.latents.shape == theirs.shape
    assert ((result.latents - theirs).norm() / theirs.norm()).item() <= 1e-5


def test_extend_writes_the_given_video_then_the_new_frames(tiny_folder, tmp_path):
    """The written video is the 21 given frames followed by 17 - 5 new ones (the decoded overlap is
    not repeated): 33 frames at the given video's size; the given frames are streamed, not held."""
    from unison.engine.io.video import video_info

    given = _given_video(tmp_path)
    sampling = families.sampling("skyreels-v2-df", steps=2, extend=str(given), height=None, width=None, frames=17,
                                 window_frames=9, overlap_frames=5)
    config = _config(tiny_folder("skyreels-v2-df"), sampling, tmp_path / "out")
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, decode=True))
    result = Engine.from_config(config).render()
    assert video_info(result.video_path) == (21 + 17 - 5, 48, 80)
    assert result.config.sampling.extend_sha256 is not None


def _extend_bad(tmp_path: Path) -> list[tuple[dict, str]]:
    given = str(_given_video(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    return [
        (dict(extend=given), "sampling.extend needs sampling.overlap_frames"),
        (dict(extend=str(tmp_path / "missing.mp4"), overlap_frames=5), "sampling.extend: no such file"),
        (dict(extend=str(text), overlap_frames=5), "is not a video ffmpeg reads"),
        (dict(extend=given, overlap_frames=25, window_frames=29, frames=33), "has 21 frames, fewer than "
                                                                            "sampling.overlap_frames (25)"),
        (dict(extend=given, overlap_frames=17, frames=17), "must be fewer than sampling.window_frames"),
    ]


def test_bad_extensions_are_refused_before_loading(tmp_path):
    for overrides, message in _extend_bad(tmp_path):
        sampling = families.sampling("skyreels-v2-df", steps=3, height=None, width=None, **overrides)
        with pytest.raises(UserError) as err:
            plan_run(RunConfig(model=ModelConfig(family="skyreels-v2-df"), sampling=sampling))
        assert message in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))
    given = str(_given_video(tmp_path))
    for family, overrides, message in [
            ("skyreels-v2-df-i2v", dict(image=families.picture(tmp_path)), "give it without sampling.image"),
            ("wan", {}, "sampling.extend is for diffusion forcing")]:
        sampling = families.sampling(family, steps=3, folder=tmp_path, extend=given,
                                     overlap_frames=5 if family != "wan" else None, **overrides)
        with pytest.raises(UserError, match=message):
            plan_run(RunConfig(model=ModelConfig(family=family), sampling=sampling))
    sampling = families.sampling("skyreels-v2-df", steps=3, extend=given, overlap_frames=5)
    with pytest.raises(UserError, match="would overwrite sampling.extend"):
        plan_run(RunConfig(model=ModelConfig(family="skyreels-v2-df"), sampling=sampling,
                           output=OutputConfig(path=given)))


def test_a_preempted_batch_job_records_its_windows_and_resumes(tmp_path, capsys):
    """`unison batch` in-process: SIGTERM during window 2 of a three-window job (2 forwards a row,
    CFG; 3 rows a window): exit 143, the attempt recorded preempted with 1 window done; the same
    command resumes inside window 2 and records the job done with its 3 windows."""
    import json
    import os

    from unison.launch.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "long", "prompt": "a long walk", "frames": 17, "window_frames": 9,
                                "overlap_frames": 5, "addnoise_condition": 20, "negative_prompt": "blur",
                                "guidance": 4.0}) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", "3", "--set",
            "model.family=skyreels-v2-df", "--set", "output.decode=false"]
    calls = []

    def signal_once(module, _):
        if type(module).__name__ == "SkyReelsV2Transformer3DModel":
            calls.append(1)
            if len(calls) == 2 * 4 + 1:  # the first forward of row 5 (window 2's second row)
                os.kill(os.getpid(), 15)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(signal_once)
    try:
        assert main(args) == 143
    finally:
        hook.remove()
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["windows"], r["resumed_from_step"]) for r in records] == \
        [("long", "preempted", 1, 0)]
    assert sorted(p.name for p in (out / "long.mp4.ckpt").glob("rank0.window*.pt")) == ["rank0.window0.pt"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["status"], r["windows"], r["resumed_from_step"]) for r in records[1:]] == [("done", 3, 5)]
    assert not (out / "long.mp4.ckpt").exists()


@pytest.mark.parametrize("name, windows, forwards", [("df-14b-540p-10s", 3, [50] * 3),
                                                     ("df-14b-720p-10s", 3, [50] * 3),
                                                     ("df-14b-540p-30s-async", 9, [70] + [65] * 8)])
def test_the_diffusion_forcing_recipes_plan(name, windows, forwards):
    """Each recipe passes the plan-time checks, and its windows and forwards are SkyReels-V2's README
    arithmetic: 257 frames in 97-frame windows with 17 overlapping is 3 windows (in 121-frame windows: also 3);
    737 is 9. Asynchronous (5 blocks of 5 frames, 5 steps apart, 50 steps) a first window takes
    50 + 4 x 5 rows; each later one, its first block given, 50 + 3 x 5."""
    from unison.engine.config import load_yaml
    from unison.engine.models import get_spec
    from unison.engine.plan import _resolve_sampling, check_sampling

    config = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "skyreels-v2" / f"{name}.yaml")
    spec = get_spec(config.model.family)
    sampling = _resolve_sampling(config.sampling, spec, tiny=False, read=lambda _: {})
    check_sampling(sampling, spec)
    assert Windows.of(sampling, temporal=4, block=sampling.causal_block_size).count == windows
    assert rows(sampling, spec.hooks, temporal=4) == forwards


def test_vae_tiling_is_refused_and_parallel_decode_resolved_off():
    sampling = families.sampling("skyreels-v2-df", steps=3)
    with pytest.raises(UserError, match="output.vae_tiling: diffusion forcing decodes window by window"):
        plan_run(RunConfig(model=ModelConfig(family="skyreels-v2-df"), sampling=sampling,
                           output=OutputConfig(vae_tiling=True)))
    plan = plan_run(RunConfig(model=ModelConfig(family="skyreels-v2-df"), sampling=sampling), world_size=1)
    assert plan.config.output.parallel_decode is False


@pytest.mark.parametrize("ar_step, forwards", [(0, 3), (1, 5)])
def test_a_last_frame_matches_diffusers_and_is_left_out_of_the_video(tiny_folder, tmp_path, ar_step, forwards):
    """--image and --last-image on one window: the latents equal diffusers' DF image-to-video
    pipeline given both pictures (its latents keep the end frame's latent frame: 4 here), and the
    written video leaves that frame out as diffusers' decode does (3 latent frames: 9 frames).
    Asynchronous, frame by frame: the picture's frame given, the next two a row apart and the end
    frame's column a row behind them: 3 + 2 rows (counted by hand from diffusers' rule), which the
    plan also counts (what a cache is checked against)."""
    from unison.engine.plan import forwards_per_video
    from PIL import Image

    from unison.engine.io.video import video_info

    folder = tiny_folder("skyreels-v2-df-i2v")
    last = tmp_path / "last.png"
    Image.open(families.picture(tmp_path)).transpose(Image.FLIP_LEFT_RIGHT).save(last)
    sampling = families.sampling("skyreels-v2-df-i2v", steps=3, folder=tmp_path, last_image=str(last), frames=9,
                                 height=48, width=80, ar_step=ar_step)
    config = _config(folder, sampling, tmp_path / "out")
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, decode=True,
                                                                    save_latents=str(tmp_path / "latents.pt")))
    result = Engine.from_config(config).render()
    pipe = families.pipeline("skyreels-v2-df-i2v", folder)
    s = result.config.sampling
    torch.manual_seed(s.seed)
    theirs = pipe(image=Image.open(s.image).convert("RGB"), last_image=Image.open(last).convert("RGB"),
                  prompt=s.prompt, negative_prompt=s.negative_prompt, height=48, width=80, num_frames=9,
                  num_inference_steps=3, guidance_scale=s.guidance, max_sequence_length=s.max_sequence_length,
                  ar_step=ar_step, generator=torch.Generator().manual_seed(s.seed), output_type="latent").frames
    ours = torch.load(tmp_path / "latents.pt")
    assert len(result.loop.steps) == forwards == forwards_per_video(s, SPECS["skyreels-v2-df-i2v"])
    assert ours.shape == theirs.shape == (1, 16, 4, 6, 10)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    assert video_info(result.video_path) == (9, 48, 80)


def test_a_last_frame_with_several_windows_is_refused(tmp_path):
    sampling = families.sampling("skyreels-v2-df-i2v", steps=3, folder=tmp_path, last_image=families.picture(tmp_path),
                                 frames=17, window_frames=9, overlap_frames=5)
    with pytest.raises(UserError, match="sampling.last_image takes one window and causal_block_size 1"):
        plan_run(RunConfig(model=ModelConfig(family="skyreels-v2-df-i2v"), sampling=sampling))


def test_dry_run_names_the_windows(capsys):
    """`--dry-run` (no weights): 737 frames in 97-frame windows, 17 overlapping, is 9 windows; with 6
    steps, 5 blocks 5 steps apart, the first window takes 6 + 4 x 5 rows and the 8 others, their
    first block given, 6 + 3 x 5: 26 + 8 x 21 = 194 forwards."""
    from unison.launch.cli import main

    assert main(["generate", "--set", "model.family=skyreels-v2-df", "--frames", "737", "--steps", "6", "--set",
                 "sampling.overlap_frames=17", "--set", "sampling.window_frames=97", "--set", "sampling.ar_step=5",
                 "--set", "sampling.causal_block_size=5", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert ("windows    9 of 97 frames, 17 overlapping, 194 forwards; asynchronous (ar_step 5, causal blocks of 5)"
            in out.out + out.err)
