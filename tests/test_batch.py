"""Batches: job lines, the manifest and resume, retries, torchrun, Ray engines (with a rank killed
mid-job) and Slurm scripts and environments.

The Ray tests share one local Ray session on loopback (each costs seconds and about 2 GiB)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unison.engine.config import ParallelConfig, RunConfig, SamplingConfig, load_yaml
from unison.launch.jobs import Manifest, parse_line
from unison.engine.errors import UserError
from unison.launch.cli import default_config_path, main

BASE = load_yaml(default_config_path())
SMALL = RunConfig(model=BASE.model, sampling=SamplingConfig(**{**BASE.sampling.__dict__, "steps": 3}),
                  output=BASE.output)
PROMPTS = ["a cat walks on the grass", "a dog runs on the beach", "neon city at night", "a flower opening",
           "an astronaut rides a horse", "waves roll in at sunset"]


def _write_jobs(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _six_jobs(path: Path) -> Path:
    return _write_jobs(path, [json.dumps({"id": f"j{i}", "prompt": p, "seed": i}) for i, p in enumerate(PROMPTS)])


def _frames(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _done_ids(out: Path) -> list[str]:
    return sorted(r["id"] for r in _records(out) if r["status"] == "done")


# ---------------------------------------------------------------------------------------------
# Job lines: every bad line is one clear message (and the line number comes from read_jobs).

BAD_LINES = [
    ("not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"seed": 1}', "'prompt' is required"),
    ('{"prompt": "  "}', "'prompt' is required"),
    ('{"prompt": "x", "colour": "red"}', "unknown key 'colour'"),
    ('{"prompt": "x", "id": "../escape"}', "id must be"),
    ('{"prompt": "x", "id": 7}', "id must be"),
    ('{"prompt": "x", "frames": 10}', "takes 4k+1 frames"),
    ('{"prompt": "x", "steps": "many"}', "sampling.steps: expected"),
    ('{"prompt": "x", "cache": "nosuchcache"}', "cache.kind: expected one of none, fbcache, pab, magcache"),
    ('{"prompt": "x", "cache": {"kind": "pab", "threshold": 0.1}}',
     "unknown config key 'cache.threshold' for cache kind pab; allowed in 'pab': kind, verify, self_skip_range"),
    ('{"prompt": "x", "cache": {"kind": "magcache"}}', "cache.mag_ratios must be given"),
    ('{"prompt": "x", "cache": {"threshold": -1, "kind": "fbcache"}}', "cache.threshold must be at least 0"),
    ('{"prompt": "x", "cache": 3}', "cache: expected a kind"),
    # Issue 15: non-finite numbers (JSON reads 1e400 as infinity), and values past the model's limits.
    ('{"prompt": "x", "guidance": 1e400}', "sampling.guidance must be a finite number, got inf"),
    ('{"prompt": "x", "cache": {"kind": "fbcache", "threshold": -1e999}}', "cache.threshold must be a finite number"),
    ('{"prompt": "x", "seed": 18446744073709551616}', "sampling.seed must be between"),
    ('{"prompt": "x", "height": 528}', "sampling.height=528 runs past the position table"),
    ('{"prompt": "x", "frames": 129}', "at most 125 (the transformer's rope_max_seq_len"),
    ('{"prompt": "x", "steps": 100000000}', "more than the scheduler's 1000 training timesteps"),
    ('{"prompt": "x", "max_sequence_length": 1000000000}', "at most 512"),
    ('{"prompt": "x", "seed": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply to read"),
    ('{"prompt": "x", "cache": {"kind": "fbcache", "threshold": ' + "[" * 20 + "]" * 20 + "}}",
     "nested more than 8 levels deep"),
    ('{"prompt": "x", "guidance": NaN}', "NaN is not valid JSON"),
    ('{"prompt": "x", "seed": 1' + "0" * 5000 + "}", "not readable JSON"),
    ('{"prompt": "a \\ud800 b"}', "lone surrogate"),
    ('{"prompt": "x", "id": "a\\n"}', "id must be"),
]


@pytest.mark.parametrize("text, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_job_lines_are_explained(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_line(text, 1, base=SMALL, out_dir=tmp_path, world_size=1)


def test_odd_jobs_files(tmp_path):
    """A bad line (not UTF-8, nested past the stack) is reported and skipped; the others still
    count, numbered as an editor numbers them. A file that is not text at all is one error."""
    from unison.launch.jobs import read_jobs

    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "one", "prompt": "a cat"}\n'
                     b'{"id": "two", "prompt": "caf\xe9"}\r\n'
                     b'{"id": "three", "prompt": "' + "[\u2028]".encode() + b'"}\n'
                     + b'{"prompt": ' + b"[" * 100000 + b"\n"
                     + b'{"id": "five", "prompt": "a dog"}')
    jobs, problems = read_jobs(path, base=SMALL, out_dir=tmp_path, world_size=1)
    assert [(j.id, j.line) for j in jobs] == [("one", 1), ("three", 3), ("five", 5)]
    assert jobs[1].config.sampling.prompt == "[\u2028]"
    assert [str(p) for p in problems] == ["line 2: not UTF-8 text (byte 0xe9 at column 29)",
                                          "line 4: nested too deeply to read; a job is an object of plain values"]
    path.write_bytes('{"prompt": "a cat"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match="not a text file"):
        read_jobs(path, base=SMALL, out_dir=tmp_path, world_size=1)


def test_manifest_reading(tmp_path):
    """Torn writes are skipped (and a record appended onto a torn line is kept); a record edited
    by hand into the wrong type, or a manifest that is not one, is one error naming the line."""
    manifest = Manifest(tmp_path)
    line = json.dumps({"id": "a", "status": "done", "attempts": 1, "seconds": 1.5, "error": None, "steps": 3,
                       "step_seconds": 0.5})
    later = line.replace('"a"', '"b"')
    manifest.path.write_text(f"{line}\n{line[:25]}{later}\n{line[:30]}", encoding="utf-8")
    assert [(r.id, r.steps) for r in manifest.records()] == [("a", 3), ("b", 3)]
    for text, message in [
        (line.replace('"attempts": 1', '"attempts": 1.5'), "line 1: not a valid record \\('attempts' should be int"),
        (line.replace('"done"', '"finished"'), "status must be one of done, retry, failed"),
        (line.replace('"attempts": 1', '"attempts": 0'), "attempts must be at least 1"),
        (line.replace('"steps"', '"stepz"'), "unknown key 'stepz'"),
        (line.replace('"seconds": 1.5, ', ""), "missing 'seconds'"),
        ('"done"', "expected a JSON object \\(a record\\), got str"),
        ("done a", "line 1: not a manifest record \\(not JSON\\)"),
    ]:
        manifest.path.write_text(text + "\n" + line + "\n")
        with pytest.raises(UserError, match=message):
            manifest.records()
    manifest.path.unlink()
    manifest.path.mkdir()
    with pytest.raises(UserError, match="is not a file"):
        manifest.records()


def test_job_ids_and_overrides(tmp_path):
    job = parse_line('{"prompt": "a cat", "seed": 5, "steps": 2, "cache": "pab"}', 1, base=SMALL,
                     out_dir=tmp_path, world_size=1)
    again = parse_line('{"seed": 5, "prompt": "a cat", "steps": 2, "cache": "pab"}', 9, base=SMALL,
                       out_dir=tmp_path, world_size=1)
    assert job.id == again.id and job.id.startswith("job-")  # derived from content, not position
    assert (job.config.sampling.seed, job.config.sampling.steps, job.config.cache.kind) == (5, 2, "pab")
    assert job.config.output.path == str(tmp_path / f"{job.id}.mp4")
    # A mapping names a kind and its own fields; the kind's config checks them.
    mag = parse_line('{"prompt": "a cat", "cache": {"kind": "magcache", "preset": "wan2.1-t2v-1.3b", '
                     '"threshold": 0.2, "max_skip_steps": 4}}', 2, base=SMALL, out_dir=tmp_path, world_size=1)
    assert (mag.config.cache.kind, mag.config.cache.threshold, mag.config.cache.max_skip_steps) == ("magcache", 0.2, 4)


# ---------------------------------------------------------------------------------------------
# One process: render, resume, interrupt, retry.

def _batch(jobs: Path, out: Path, *extra: str) -> int:
    return main(["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", "3", *extra])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The six jobs rendered by one process: the reference every launcher must equal."""
    root = tmp_path_factory.mktemp("single")
    jobs = _six_jobs(root / "jobs.jsonl")
    assert _batch(jobs, root / "out") == 0
    return jobs, root / "out"


def test_single_process_batch_and_resume(single, monkeypatch, capsys):
    jobs, out = single
    assert _done_ids(out) == [f"j{i}" for i in range(6)]
    for i in range(6):
        assert _frames(out / f"j{i}.mp4").shape == (9, 64, 64, 3)
        assert load_yaml(out / f"j{i}.yaml").sampling.prompt == PROMPTS[i]
    assert not list(out.glob(".*"))  # no temporary file left
    before = (out / "manifest.jsonl").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    import unison.engine.worker as worker

    monkeypatch.setattr(worker.Worker, "__init__", lambda *a, **k: pytest.fail("a finished batch loaded a model"))
    assert _batch(jobs, out) == 0
    assert (out / "manifest.jsonl").read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert "0 done, 0 failed, 0 retries, 6 already finished" in capsys.readouterr().out


def test_interrupt_then_resume_renders_each_job_once(tmp_path, monkeypatch, capsys):
    import unison.engine.render as render

    jobs = _write_jobs(tmp_path / "jobs.jsonl", [
        '{"id": "one", "prompt": "a cat walks on the grass"}',
        "{corrupt",
        '{"id": "two", "prompt": "a dog runs on the beach"}',
        '{"id": "three", "prompt": "neon city at night"}',
    ])
    out = tmp_path / "out"
    real = render.Engine.render
    calls: list[str] = []

    def interrupted(self, config=None, **kw):
        calls.append(Path(config.output.path).stem)
        if len(calls) == 2:  # Ctrl-C during the second video
            raise KeyboardInterrupt
        return real(self, config, **kw)

    monkeypatch.setattr(render.Engine, "render", interrupted)
    assert _batch(jobs, out) == 130
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "interrupted" in err
    assert _done_ids(out) == ["one"] and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "one.mp4",
                                                                                    "one.yaml"]
    first = (out / "one.mp4").stat().st_mtime_ns

    monkeypatch.setattr(render.Engine, "render", real)
    assert _batch(jobs, out) == 0
    assert [r["id"] for r in _records(out)] == ["one", "two", "three"]  # each exactly once
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in _records(out))
    assert (out / "one.mp4").stat().st_mtime_ns == first


def test_failed_jobs_are_retried_then_marked_failed(tmp_path, monkeypatch):
    import unison.engine.render as render

    jobs = _write_jobs(tmp_path / "jobs.jsonl", ['{"id": "flaky", "prompt": "a cat"}',
                                                 '{"id": "broken", "prompt": "a dog"}',
                                                 '{"id": "fine", "prompt": "a flower"}'])
    real = render.Engine.render
    seen: list[str] = []

    def faulty(self, config=None, **kw):
        name = Path(config.output.path).stem
        seen.append(name)
        if name == "broken" or name == "flaky" and seen.count("flaky") == 1:
            raise RuntimeError(f"simulated failure of {name}")
        return real(self, config, **kw)

    monkeypatch.setattr(render.Engine, "render", faulty)
    out = tmp_path / "out"
    assert _batch(jobs, out, "--max-retries", "1") == 1  # a failed job makes the exit code 1
    records = [(r["id"], r["status"], r["attempts"]) for r in _records(out)]
    assert records == [("flaky", "retry", 1), ("flaky", "done", 2), ("broken", "retry", 1),
                       ("broken", "failed", 2), ("fine", "done", 1)]
    assert _records(out)[3]["error"] == "RuntimeError: simulated failure of broken"
    assert not (out / "broken.mp4").exists()
    seen.clear()
    assert _batch(jobs, out, "--max-retries", "1") == 0  # failed is final: the rerun renders nothing
    assert seen == []


# ---------------------------------------------------------------------------------------------
# Issue 15: one batch per folder (a lock), and a finished batch starts nothing.

def _finished_batch(root: Path) -> tuple[Path, Path]:
    """Two jobs already done (records, and stand-in videos on disk): a rerun renders nothing."""
    from unison.launch.jobs import Record

    jobs = _write_jobs(root / "jobs.jsonl", ['{"id": "a", "prompt": "a cat"}', '{"id": "b", "prompt": "a dog"}'])
    out = root / "out"
    out.mkdir()
    for name in ("a", "b"):
        (out / f"{name}.mp4").write_bytes(b"stand-in")
        Manifest(out).append(Record(id=name, status="done", attempts=1, seconds=1.0, steps=3, step_seconds=0.3))
    return jobs, out


def test_second_batch_on_a_locked_folder_is_refused(tmp_path, monkeypatch, capsys):
    """While a batch holds DIR/.unison.lock, another (local or Ray driver) exits 2 at once naming
    it, loading nothing; a holder killed with SIGKILL leaves no lock behind, and the batch runs."""
    import signal
    import socket
    import time

    import unison.launch.ray_batch as ray_batch
    from unison.launch.batch import OutputLock

    jobs, out = _finished_batch(tmp_path)
    (out / "a.mp4").unlink()  # a job to do: the refusal must come before the model or Ray
    monkeypatch.setattr(ray_batch, "connect", lambda *a, **k: pytest.fail("a refused batch connected to Ray"))
    import unison.engine.worker as worker

    monkeypatch.setattr(worker.Worker, "__init__", lambda *a, **k: pytest.fail("a refused batch loaded a model"))
    with OutputLock(out):
        for extra in ((), ("--ray", "local")):
            started = time.monotonic()
            assert _batch(jobs, out, *extra) == 2
            assert time.monotonic() - started < 5
            assert capsys.readouterr().err.strip().splitlines() == [
                f"unison: error: --out {out} is in use by another batch (pid {os.getpid()} on "
                f"{socket.gethostname()}); wait for it to end or pick another folder"]
    assert not (out / ".unison.lock").exists()
    monkeypatch.undo()

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / '.unison.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on elsewhere')\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    assert _batch(jobs, out) == 2 and "(pid 1 on elsewhere)" in capsys.readouterr().err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    _write_jobs(jobs, [*jobs.read_text().splitlines(), '{"id": "c", "prompt": "a flower"}'])
    assert _batch(jobs, out) == 0  # the stale lock file is no obstacle
    assert "2 done, 0 failed, 0 retries, 1 already finished" in capsys.readouterr().out
    assert _done_ids(out) == ["a", "a", "b", "c"] and not list(out.glob(".*"))


def test_finished_batch_on_ray_starts_no_ray(tmp_path, monkeypatch, capsys):
    import time

    ray = pytest.importorskip("ray")
    import unison.launch.ray_batch as ray_batch

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a finished batch started Ray"))
    monkeypatch.setattr(ray_batch, "connect", lambda *a, **k: pytest.fail("a finished batch connected to Ray"))
    jobs, out = _finished_batch(tmp_path)
    started = time.monotonic()
    assert _batch(jobs, out, "--ray", "local") == 0
    assert time.monotonic() - started < 5
    assert "0 done, 0 failed, 0 retries, 2 already finished" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# torchrun: two ranks are one engine; same videos as one process.

def _assert_same_videos(out: Path, reference: Path, ids: list[str]) -> None:
    for name in ids:
        ours, theirs = _frames(out / f"{name}.mp4").astype(int), _frames(reference / f"{name}.mp4").astype(int)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 2, name  # same latents to ~1e-6; mp4 rounding may move a level


def test_torchrun_batch_with_two_ranks(single, tmp_path):
    jobs, reference = single
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    from multirank import free_port

    run = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(free_port()), "-m", "unison", "batch", str(jobs), "--out", str(out),
                          "--no-progress", "--steps", "3", "--ulysses", "2", "--set", "parallel.timeout_s=60"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 done, 0 failed" in run.stdout
    assert _done_ids(out) == [f"j{i}" for i in range(6)]
    _assert_same_videos(out, reference, [f"j{i}" for i in range(6)])


# ---------------------------------------------------------------------------------------------
# Ray: two engines of two ranks on a local cluster.

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _ray_batch(jobs: Path, out: Path, *, on_start=None, max_retries: int = 2):
    from unison.launch.jobs import Manifest
    from unison.launch.batch import Ledger, prepare
    from unison.launch.ray_batch import RayBatch, options_for_cluster

    config = RunConfig(model=SMALL.model, sampling=SMALL.sampling, output=SMALL.output,
                       parallel=ParallelConfig(ulysses=2, timeout_s=60))
    batch = prepare(jobs, out, base=config, world_size=2)
    ledger = Ledger(Manifest(out), batch, max_retries=max_retries)
    RayBatch(config, options_for_cluster(engines=2, ranks_per_engine=2), on_start=on_start).run(batch.todo, ledger)
    return ledger


# Two engines rendering a batch, every video equal to one process's, and a rank killed mid-job
# (its engine rebuilt, the job retried from its checkpoint): tests/test_chaos.py (a batch on two
# engines under four faults); tests/test_serve.py kills a rank of the service's Ray engine.


def test_generate_on_ray_renders_one_video(ray_local, tmp_path, capsys):
    video = tmp_path / "one.mp4"
    assert main(["generate", "--ray", "local", "--ulysses", "2", "--steps", "3", "--output", str(video),
                 "--set", "output.progress=false"]) == 0
    assert _frames(video).shape == (9, 64, 64, 3) and video.with_suffix(".yaml").is_file()
    assert "1 done" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Slurm: scripts are valid bash; srun's environment parses into ranks and the rendezvous address.

@pytest.mark.parametrize("mode, extra", [("torchrun", []), ("torchrun", ["--jobs", "j.jsonl", "--out", "v"]),
                                         ("ray", ["--jobs", "j.jsonl", "--out", "v", "--partition", "gpu"]),
                                         ("ray", ["--jobs", "j.jsonl", "--out", "v", "--partition", "gpu,debug",
                                                  "--time", "1-12:30", "--job-name", "wan.t2v-run_2"])])
def test_slurm_scripts_are_valid_bash(tmp_path, capsys, mode, extra):
    assert main(["slurm", "--mode", mode, "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 *extra]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert not re.search(r"@[A-Z_]+@", text)  # every placeholder filled
    assert "#SBATCH --nodes=1" in text and "--gpus-per-node=1" in text
    assert ("--no-python unison" in text) == (mode == "torchrun")
    assert ("--ray auto" in text) == (mode == "ray")
    assert ("batch j.jsonl --out v --config tiny-wan.yaml" in text) == bool(extra)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--gpus-per-node", "8"], "parallel degrees multiply to 1, but 2 nodes x 8 GPUs make 16"),
    (["--mode", "ray", "--nodes", "1", "--gpus-per-node", "1"], "--mode ray runs a batch"),
    (["--nodes", "0", "--gpus-per-node", "1"], "must be at least 1"),
])
def test_slurm_bad_requests(capsys, args, message):
    assert main(["slurm", "--config", "tiny-wan.yaml", *args]) == 2
    assert message in capsys.readouterr().err


def test_slurm_script_quotes_paths(tmp_path, capsys, monkeypatch):
    """Paths go into the script's command line shell-quoted: bash reads back exactly the words given,
    and nothing in them runs."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "it's $(touch pwned); a\nrecipe.yaml"
    recipe.write_text(default_config_path().read_text())
    jobs, out = "jobs `touch pwned`.jsonl", "out dir;touch pwned"
    assert main(["slurm", "--mode", "ray", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "1",
                 "--jobs", jobs, "--out", out, "--time", "90"]) == 0
    script = capsys.readouterr().out
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "#SBATCH --time=90\n" in script
    command = script[script.index("\nunison ") + 1:script.index(" || status")]
    # Let bash itself split the command line, with `unison` replaced by printf of its arguments.
    listed = subprocess.run(["bash", "-c", f"unison() {{ printf '%s\\0' \"$@\"; }}; {command}"],
                            capture_output=True, cwd=tmp_path)
    assert listed.stdout.decode().split("\0")[:-1] == ["batch", jobs, "--out", out, "--config", str(recipe), "--ray",
                                                      "auto", "--ranks-per-engine", "1"]
    assert not (tmp_path / "pwned").exists()


def test_slurm_environment_parses_into_ranks_and_address():
    from unison.launch.dist import DistEnv, expand_nodelist

    assert expand_nodelist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert expand_nodelist("a,b[9-11]") == ["a", "b9", "b10", "b11"]
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "node[07-10]"}
    env = DistEnv.detect(slurm)
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.init_method == f"tcp://node07:{29500 + 4242 % 20000}"
    assert DistEnv.detect({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).init_method == \
        "tcp://10.0.0.1:1234"
    # srun torchrun sets both: torchrun's variables win, and it rendezvouses through its agent's store.
    both = DistEnv.detect({**slurm, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"})
    assert (both.source, both.rank, both.world_size, both.init_method) == ("torchrun", 3, 16, "env://")
    assert DistEnv.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    from unison.launch.ray_batch import rank_order

    assert rank_order(["b", "a", "b", "a"]) == [0, 2, 1, 3]  # consecutive ranks share a node


def test_ray_interrupt_stops_every_engine_and_the_batch_resumes(ray_local, single, tmp_path):
    jobs, reference = single

    def interrupt(slot, job):
        if job.id == "j3":
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _ray_batch(jobs, out, on_start=interrupt)
    from ray.util import placement_group_table

    assert {g["state"] for g in placement_group_table().values()} <= {"REMOVED"}  # every engine is down
    finished = _done_ids(out)
    assert "j3" not in finished and set(finished) <= {"j0", "j1", "j2", "j4", "j5"}
    assert _batch(jobs, out) == 0  # resume in one process
    assert _done_ids(out) == [f"j{i}" for i in range(6)] and len(_records(out)) == 6
    _assert_same_videos(out, reference, ["j3"])


def test_a_job_whose_outputs_would_replace_an_input_is_refused(tmp_path, capsys):
    """Job "recipe" would write recipe.yaml over the --config it was started with, job "jobs" its
    YAML over the jobs file itself: both lines are refused, nothing is written or changed."""
    out = tmp_path / "out"
    out.mkdir()
    recipe = out / "recipe.yaml"
    recipe.write_text("# mine\nmodel:\n  family: wan\n")
    jobs = out / "jobs.yaml"
    jobs.write_text('{"id": "recipe", "prompt": "a cat"}\n{"id": "jobs", "prompt": "a dog"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["batch", str(jobs), "--out", str(out), "--config", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"line 1: the config written beside output.path ({out / 'recipe.yaml'}) would overwrite --config" in err
    assert f"line 2: the config written beside output.path ({out / 'jobs.yaml'}) would overwrite the jobs file" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
