"""Issue 15, the chaos test: renders survive injected faults (engine/io/faults.py) on every launcher,
each video bit-identical to an uninterrupted single-process render, each job done exactly once,
and no fault costing more than `checkpoint_every` recomputed steps.

The steps computed are counted independently of the engine's progress reports: the injector logs
every scheduler step each rank finishes. Ulysses 2 on the tiny default is bitwise equal to one
process (asserted in tests/test_signals.py's references too), so "bit-identical" is exact here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multirank import free_port
from unison.engine.io.faults import draw, steps_computed
from unison.launch.jobs import Manifest, recomputed
from unison.launch.cli import main

STEPS = 6
EVERY = 2
PROMPTS = ["a cat walks on the grass", "a dog runs on the beach", "neon city at night", "a flower opening",
           "an astronaut rides a horse"]


def _frames(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


def _env(faults: list[dict], folder: Path) -> dict:
    folder.mkdir(exist_ok=True)
    return dict(os.environ, UNISON_FAULTS=json.dumps(faults), UNISON_FAULTS_DIR=str(folder), OMP_NUM_THREADS="1",
                MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false")


def _fired(folder: Path) -> set[int]:
    return {int(p.name.split(".")[1]) for p in folder.glob("fired.*")}


def _recomputed_by_count(folder: Path, steps: int) -> dict[str, int]:
    """Per job, steps finished beyond the video's own, from the injector's log (ranks step in
    lockstep: the most any rank finished)."""
    return {job: max(per_rank.values()) - steps for job, per_rank in steps_computed(folder).items()}


def test_ray_batch_survives_four_faults(tmp_path):
    """5 jobs on 2 local Ray engines of 2 ranks (Ulysses 2) under the four faults `draw` places
    from a seed: a rank SIGKILLed mid-job, a job raising on every rank, SIGTERM to the driver
    (exit 143, then the same command again), and a second kill in the resumed job."""
    pytest.importorskip("ray")
    ids = [f"c{i}" for i in range(len(PROMPTS))]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": i, "prompt": p, "seed": n}) + "\n"
                            for n, (i, p) in enumerate(zip(ids, PROMPTS))))
    faults = draw(2026, ids, steps=STEPS, every=EVERY)
    out, book = tmp_path / "out", tmp_path / "faults"
    command = [sys.executable, "-m", "unison", "batch", str(jobs), "--out", str(out), "--no-progress",
               "--steps", str(STEPS), "--ulysses", "2", "--ray", "local", "--engines", "2", "--max-retries", "3",
               "--set", f"output.checkpoint_every={EVERY}", "--set", "parallel.timeout_s=60"]
    first = subprocess.run(command, env=_env(faults, book), capture_output=True, text=True, timeout=600)
    assert first.returncode == 143, first.stderr[-3000:]
    said = [line for line in first.stderr.splitlines() if line.startswith("unison: ")]
    assert said[-1].startswith("unison: batch preempted: ") and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert 2 in _fired(book)  # the driver's SIGTERM
    unfinished = set(ids) - {r.id for r in Manifest(out).records() if r.status == "done"}
    second = subprocess.run(command, env=_env(faults, book), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _fired(book) == {0, 1, 2, 3}  # every fault happened

    records = Manifest(out).records()
    assert sorted(r.id for r in records if r.status == "done") == ids  # every job done exactly once
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"{i}.mp4" for i in ids]
    assert not list(out.glob("*.ckpt")) and not list(out.glob(".*.part.*"))
    killed, raising = faults[0]["job"], faults[1]["job"]
    statuses = {i: [r.status for r in records if r.id == i] for i in ids}
    assert statuses[killed].count("retry") == 2 and statuses[killed][-1] == "done", statuses  # two kills
    assert "retry" in statuses[raising], statuses
    # The killed job's last attempt resumed from a checkpoint, not from step 0.
    assert next(r for r in records if r.id == killed and r.status == "done").resumed_from_step > 0

    # Steps recomputed: counted from the scheduler's calls, against the manifest's account.
    counted = _recomputed_by_count(book, STEPS)
    assert set(counted) == set(ids)
    stops = {i: sum(r.status in ("retry", "preempted") for r in records if r.id == i) for i in ids}
    for job in ids:
        assert 0 <= counted[job] <= EVERY * stops[job], (job, counted[job], stops[job])
    assert recomputed(records) == sum(counted.values()) > 0
    # The second run's summary: the jobs it rendered, earlier attempts included.
    assert f"{recomputed(r for r in records if r.id in unfinished)} steps recomputed after faults" in second.stdout

    # Every video equals an uninterrupted single-process render of the same jobs, bit for bit.
    reference = tmp_path / "reference"
    assert main(["batch", str(jobs), "--out", str(reference), "--no-progress", "--steps", str(STEPS)]) == 0
    for job in ids:
        assert np.array_equal(_frames(out / f"{job}.mp4"), _frames(reference / f"{job}.mp4")), job


# ---------------------------------------------------------------------------------------------
# torchrun

def _torchrun(args: list[str], *, env: dict, restarts: int = 0) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--max-restarts", str(restarts),
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "unison", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_sigterm_mid_video_then_rerun_is_bit_identical(tmp_path):
    """SIGTERM to torchrun's agent during step 2: it forwards the signal, both ranks stop at the
    same step with a checkpoint and exit 143; the same command resumes and ends bit-identical."""
    video, latents = tmp_path / "v.mp4", tmp_path / "v.pt"
    args = ["generate", "--ulysses", "2", "--steps", str(STEPS), "--output", str(video), "--save-latents", str(latents),
            "--set", "output.progress=false", "--set", "parallel.timeout_s=60"]
    book = tmp_path / "faults"
    stopped = _torchrun(args, env=_env([{"job": "v", "step": 2, "action": "signal-driver", "rank": 0}], book))
    assert stopped.returncode != 0 and not video.exists() and not latents.exists()
    assert "unison: preempted at step" in stopped.stderr, stopped.stderr[-3000:]
    assert list((tmp_path / "v.mp4.ckpt").glob("rank1.step*.pt"))
    again = _torchrun(args, env=_env([], tmp_path / "none"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the checkpoint after step" in again.stderr
    assert not (tmp_path / "v.mp4.ckpt").exists()
    counted = steps_computed(book)["v"]
    assert counted[0] == counted[1] < STEPS  # the stopped run's steps; the rerun's are not logged
    reference = tmp_path / "reference.pt"
    assert main(["generate", "--steps", str(STEPS), "--output", str(tmp_path / "r.mp4"), "--save-latents",
                 str(reference), "--set", "output.progress=false", "--set", "output.decode=false"]) == 0
    assert torch.equal(torch.load(latents), torch.load(reference))


def test_torchrun_max_restarts_resumes_a_killed_rank_from_the_checkpoint(tmp_path):
    """Rank 1 SIGKILLed at step 3 (checkpoint_every 2): torchrun restarts both ranks once, the
    batch resumes the job from the checkpoint after step 2, not from step 0, and the video equals
    the uninterrupted one; the manifest tells where each attempt started, the summary what it cost."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "k", "prompt": PROMPTS[0], "seed": 5}) + "\n")
    out, book = tmp_path / "out", tmp_path / "faults"
    args = ["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", str(STEPS), "--ulysses", "2",
            "--set", f"output.checkpoint_every={EVERY}", "--set", "parallel.timeout_s=60"]
    run = _torchrun(args, env=_env([{"job": "k", "step": 3, "action": "kill", "rank": 1}], book), restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    records = Manifest(out).records()
    assert records[-1].status == "done" and records[-1].resumed_from_step == 2 and records[-1].steps == STEPS - 2
    counted = max(steps_computed(book)["k"].values())
    assert counted == 3 + (STEPS - 2)  # 3 steps before the kill, then 2..5 again: one step recomputed
    assert f"{counted - STEPS} steps recomputed after faults" in run.stdout, run.stdout
    reference = tmp_path / "reference"
    assert main(["batch", str(jobs), "--out", str(reference), "--no-progress", "--steps", str(STEPS)]) == 0
    assert np.array_equal(_frames(out / "k.mp4"), _frames(reference / "k.mp4"))


def test_ray_failed_write_ends_the_batch_and_is_never_done(tmp_path):
    """The encoder fails on a Ray engine (as on a full disk): the attempt is recorded, never done,
    the batch ends at once with exit 74 and one line (the next job would fail alike), no video."""
    pytest.importorskip("ray")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in zip(["w0", "w1"], PROMPTS)))
    out = tmp_path / "out"
    env = dict(_env([], tmp_path / "faults"), IMAGEIO_FFMPEG_EXE="/bin/false")  # Ray's workers inherit it
    run = subprocess.run([sys.executable, "-m", "unison", "batch", str(jobs), "--out", str(out), "--no-progress",
                          "--steps", "1", "--ulysses", "2", "--ray", "local", "--engines", "1",
                          "--set", "parallel.timeout_s=60"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 74, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"unison: error: could not write {out / 'w0.mp4'}: the video encoder (ffmpeg) exited"), last
    assert [(r.id, r.status) for r in Manifest(out).records()] == [("w0", "retry")]
    assert not list(out.glob("*.mp4")) and not list(out.glob(".*.part.*"))
