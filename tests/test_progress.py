"""Progress never looks hung (issue 15): a render reports each phase as it begins (encoding, every
step, decoding, writing), a worker's Progress carries it (loading while it builds), and the local
batch bar and the Ray driver's per-engine lines print it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from unison.engine.config import OutputConfig, RunConfig, SamplingConfig, load_yaml
from unison.launch.jobs import Job
from unison.engine.worker import Progress, Worker
from unison.launch.cli import default_config_path

BASE = load_yaml(default_config_path())
STEPS = 3


def _config(path: Path) -> RunConfig:
    return RunConfig(model=BASE.model, sampling=SamplingConfig(**{**BASE.sampling.__dict__, "steps": STEPS}),
                     output=OutputConfig(**{**BASE.output.__dict__, "path": str(path)}))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return Worker.from_config(_config(tmp_path_factory.mktemp("progress") / "v.mp4"))


def test_render_reports_every_phase_in_order(worker, tmp_path, capsys):
    heard = []
    config = _config(tmp_path / "a.mp4")
    result = worker.engine.render(config, progress=True, on_phase=lambda *a: heard.append(a))
    assert heard == [("encoding", 0, STEPS), *[("step", k, STEPS) for k in range(1, STEPS + 1)],
                     ("decoding", STEPS, STEPS), ("writing", STEPS, STEPS)]
    assert result.video_path.is_file()
    # generate's own output on rank 0: a line per phase (the steps have their bar).
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unison: ")]
    assert lines == ["unison: encoding", "unison: decoding", "unison: writing"]


def test_worker_progress_shows_decoding_while_decode_runs(worker, tmp_path, monkeypatch, capsys):
    seen_in_decode = []
    decode = worker.engine.decode

    def watched(*args, **kwargs):
        seen_in_decode.append(worker.progress())  # what another thread (the Ray driver) would read
        return decode(*args, **kwargs)

    monkeypatch.setattr(worker.engine, "decode", watched)
    told: list[str] = []
    job = Job(id="cat", line=1, config=_config(tmp_path / "cat.mp4"))
    outcome = worker.run(job, on_progress=lambda p: told.append(p.describe()))
    assert outcome.steps == STEPS
    assert [(p.job, p.phase) for p in seen_in_decode] == [("cat", "decoding")]
    assert told == ["job cat, encoding", *[f"job cat, step {k}/{STEPS}" for k in range(1, STEPS + 1)],
                    "job cat, decoding", "job cat, writing"]
    assert worker.progress() == Progress(job=None, step=0, steps=0, phase="idle")
    # output.progress is off in a worker: no phase lines.
    assert "unison: " not in capsys.readouterr().err


def test_worker_reports_loading_before_its_engine_builds(monkeypatch):
    import unison.engine.worker as worker_module

    told = []

    class Built:  # stands in for the engine: records what the worker said before building it
        def __init__(self, plan):
            self.before = list(told)

    monkeypatch.setattr(worker_module, "Engine", Built)
    built = Worker(plan=None, on_progress=told.append)
    assert [p.phase for p in built.engine.before] == ["loading"]
    assert built.engine.before[0].describe() == "loading"
    assert built.progress().phase == "idle"


def test_engine_and_batch_lines_name_the_phase():
    from unison.launch.batch import Batch, Ledger
    from unison.launch.ray_batch import LOADING, engine_line

    decoding = Progress(job="cat", step=50, steps=50, phase="decoding")
    stepping = Progress(job="dog", step=12, steps=50, phase="step")
    assert engine_line(1, "cat", decoding) == "engine 1: job cat, decoding"
    assert engine_line(0, "dog", stepping) == "engine 0: job dog, step 12/50"
    assert engine_line(0, "dog", dataclasses.replace(stepping, phase="checkpointing")) == \
        "engine 0: job dog, checkpointing"
    assert engine_line(2, None, LOADING) == "engine 2: loading"
    assert engine_line(2, None, None) == "engine 2: idle"
    # Rank 0 not yet on the driver's job (or its progress unreadable): the job alone.
    assert engine_line(3, "cat", Progress(job=None, step=0, steps=0)) == "engine 3: job cat"
    assert engine_line(3, "cat", None) == "engine 3: job cat"

    ledger = Ledger(None, Batch(todo=[], attempts={}, skipped=0, total=1, problems=[]), max_retries=0)
    try:
        ledger.show(decoding)
        assert ledger.bar.postfix == "job cat, decoding"
        ledger.show(stepping)
        assert ledger.bar.postfix == "job dog, step 12/50"
    finally:
        ledger.close()
