"""Issue 15, signals: SIGTERM or SIGUSR1 on any rank during a render stops every rank at the same
step with a step checkpoint there (checkpoint_every 0), one line and exit 143; the same command
then resumes and ends bit-identical to an uninterrupted render. The Slurm scripts ask for the
signal and the requeue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multirank import free_port, run_ranks
from unison.engine.render import Engine
from unison.launch.cli import build_config, main, parser

HELPER = Path(__file__).with_name("signalled_rank.py")
STEPS = 8
CALLS_PER_STEP = 2  # the tiny Wan default: cond and uncond
MESSAGE = re.compile(r"unison: preempted at step (\d+) of (\d+); checkpoint in (\S+); run the same command to resume")


def _args(folder: Path, name: str, *extra: str) -> list[str]:
    return ["--steps", str(STEPS), "--output", str(folder / f"{name}.mp4"),
            "--save-latents", str(folder / f"{name}.pt"), "--set", "output.progress=false", *extra]


def _launch(args: list[str], *, env: dict, ranks: int = 1, signal_rank: int | None = None) -> list:
    """Run `args` on `ranks` processes (one each, as srun would); `signal_rank` runs the helper that
    signals itself. Returns (returncode, stderr) per rank."""
    procs = []
    for rank in range(ranks):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if ranks > 1 else dict(env)
        entry = [str(HELPER)] if signal_rank is not None else ["-m", "unison"]
        procs.append(subprocess.Popen([sys.executable, *entry, *args], env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [(p.returncode, out[1]) for p, out in ((p, p.communicate(timeout=180)) for p in procs)]


def _preempted_step(rc: int, err: str) -> int:
    assert rc == 143, err[-2000:]
    match = MESSAGE.fullmatch(err.strip().splitlines()[-1])
    assert match, err[-2000:]
    assert int(match.group(2)) == STEPS
    return int(match.group(1))


def _in_process(rank: int, world: int, args: list[str]) -> tuple[torch.Tensor, int | None]:
    """The same command rendered in-process (on the test pool's ranks for world > 1, no interpreter
    to start): its latents and the step it resumed from."""
    config = build_config(parser().parse_args(["generate", *args, "--set", "output.decode=false"]))
    result = Engine.from_config(config, world_size=world).render()
    return result.latents, result.loop.resumed_from_step


def _base_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def test_sigterm_checkpoints_exits_143_and_resumes_bit_identically(tmp_path, caplog):
    env = _base_env()
    # SIGTERM during the third step: stops at its end, a checkpoint though checkpoint_every is 0.
    [(rc, err)] = _launch(_args(tmp_path, "video"), env=dict(env, SIGNAL="TERM", SIGNAL_AT=str(2 * CALLS_PER_STEP + 1)),
                          signal_rank=0)
    assert _preempted_step(rc, err) == 3
    assert (tmp_path / "video.mp4.ckpt" / "rank0.step3.pt").is_file()
    assert not (tmp_path / "video.mp4").exists() and not (tmp_path / "video.pt").exists()
    caplog.set_level("INFO", logger="unison")
    assert main(_args(tmp_path, "video")) == 0  # the same command, in-process (no interpreter to start)
    assert "resuming from the checkpoint after step 3" in caplog.text
    assert (tmp_path / "video.mp4").is_file() and not (tmp_path / "video.mp4.ckpt").exists()
    reference, resumed = _in_process(0, 1, _args(tmp_path, "reference"))
    assert resumed is None
    assert torch.equal(torch.load(tmp_path / "video.pt"), reference)


def test_sigusr1_on_one_rank_stops_both_at_the_same_step(tmp_path):
    env = dict(_base_env(), MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", WORLD_SIZE="2",
               SIGNAL="USR1", SIGNAL_AT=str(2 * CALLS_PER_STEP + 1))
    args = _args(tmp_path, "video", "--ulysses", "2", "--set", "output.decode=false")
    first = _launch(args, env=dict(env, MASTER_PORT=str(free_port())), ranks=2, signal_rank=1)
    # Rank 1 is signalled during step 3 and publishes stop_at = 3 + 2; rank 0 was never signalled.
    assert [_preempted_step(rc, err) for rc, err in first] == [5, 5]
    ckpt = tmp_path / "video.mp4.ckpt"
    assert (ckpt / "rank0.step5.pt").is_file() and (ckpt / "rank1.step5.pt").is_file()
    assert not (tmp_path / "video.pt").exists()
    # The rerun and the uninterrupted reference on the test pool's two ranks (no interpreters to start).
    again = run_ranks(2, _in_process, args)
    assert [resumed for _, resumed in again] == [5, 5]
    assert not ckpt.exists()
    reference = run_ranks(2, _in_process, _args(tmp_path, "reference", "--ulysses", "2"))
    assert reference[0][1] is None
    assert torch.equal(again[0][0], reference[0][0]) and torch.equal(again[1][0], reference[0][0])


@pytest.mark.parametrize("mode", ["torchrun", "ray"])
def test_slurm_scripts_ask_for_the_signal_and_requeue(tmp_path, capsys, mode):
    extra = ["--jobs", "jobs.jsonl", "--out", str(tmp_path / "out")] if mode == "ray" else []
    assert main(["slurm", "--mode", mode, "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 *extra]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert "#SBATCH --signal=B:USR1@120" in lines and "#SBATCH --requeue" in lines
    assert any(line.startswith("trap ") and "USR1" in line for line in lines)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_preempted_batch_job_is_recorded_preempted_and_resumes(tmp_path, capsys, caplog):
    """In-process (the test's main thread holds the handlers): SIGTERM during the first job's second
    step; the attempt is recorded `preempted` (not done, not failed, no attempt used), exit 143; the
    same command resumes that job from its checkpoint and finishes the batch."""
    import json

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "one", "prompt": "a cat walks on the grass"}\n'
                    '{"id": "two", "prompt": "a dog runs on the beach"}\n')
    out = tmp_path / "out"
    args = ["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", "4", "--set", "output.decode=false"]
    calls = []

    def signal_once(module, _):
        if type(module).__name__ == "WanTransformer3DModel":
            calls.append(1)
            if len(calls) == CALLS_PER_STEP + 1:
                os.kill(os.getpid(), 15)

    caplog.set_level("INFO", logger="unison")
    hook = torch.nn.modules.module.register_module_forward_pre_hook(signal_once)
    try:
        assert main(args) == 143
    finally:
        hook.remove()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"unison: preempted at step 2 of 4; checkpoint in {out / 'one.mp4.ckpt'}; run the same command to resume")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["attempts"]) for r in records] == [("one", "preempted", 1)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["attempts"]) for r in records[1:]] == [("one", "done", 1), ("two", "done", 1)]
    assert "resuming from the checkpoint after step 2" in caplog.text
    assert not (out / "one.mp4.ckpt").exists()


def test_stop_request_agrees_through_the_store():
    """The signalled rank publishes its boundary + AHEAD; the first value wins; every rank stops there."""
    import torch.distributed as dist

    from unison.engine.io.stop import AHEAD, StopRequest

    store = dist.HashStore()
    signalled, other, late = StopRequest(store, key="k"), StopRequest(store, key="k"), StopRequest(store, key="k")
    assert not other.should_stop(3)
    signalled.signalled = True
    assert not signalled.should_stop(3)  # publishes 3 + AHEAD
    late.signalled = True
    assert not late.should_stop(4)  # a later signal does not move the step
    assert [r.should_stop(3 + AHEAD - 1) for r in (signalled, other, late)] == [False] * 3
    assert [r.should_stop(3 + AHEAD) for r in (signalled, other, late)] == [True] * 3
    alone = StopRequest()
    assert not alone.should_stop(1)
    alone.signalled = True
    assert alone.should_stop(1)


def test_every_rank_exits_143_when_a_launcher_signals_it_on_its_way_out(tmp_path):
    """torchrun's agent SIGTERMs the remaining ranks once one has exited: a rank that is past its
    render by then must still exit 143, not die of the signal (the launcher would report a crash).
    Here the harness plays the agent: rank 1 is signalled mid-step; once rank 0 has printed its
    preempted line (its render is over), it gets SIGTERM too. Two tries, each a new race
    (tests/test_chaos.py signals torchrun ranks twice more)."""
    import signal
    import time

    env = dict(_base_env(), MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", WORLD_SIZE="2",
               SIGNAL="TERM", SIGNAL_RANK="1", SIGNAL_AT=str(2 * CALLS_PER_STEP + 1))
    for attempt in range(2):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        args = _args(folder, "video", "--ulysses", "2", "--set", "output.decode=false")
        port = str(free_port())
        procs, logs = [], []
        for rank in range(2):
            logs.append(folder / f"rank{rank}.err")
            with open(logs[-1], "w") as err:
                procs.append(subprocess.Popen([sys.executable, str(HELPER), *args], stdout=subprocess.DEVNULL,
                                              stderr=err, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank),
                                                                   MASTER_PORT=port)))
        deadline = time.monotonic() + 180
        while "unison: preempted at step" not in logs[0].read_text() and time.monotonic() < deadline \
                and procs[0].poll() is None:
            time.sleep(0.01)
        procs[0].send_signal(signal.SIGTERM)  # the agent's signal, after rank 0's render
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [143, 143], (attempt, codes, logs[0].read_text()[-1500:], logs[1].read_text()[-1500:])
        steps = {_preempted_step(143, log.read_text().strip().splitlines()[-1]) for log in logs}
        assert steps == {5}  # both stopped where rank 1 published (step 3 + 2), checkpoints in place
        assert all((folder / "video.mp4.ckpt" / f"rank{r}.step5.pt").is_file() for r in range(2))


def test_under_torchrun_every_rank_exits_143(tmp_path):
    """SIGTERM to one rank of `torchrun --nproc-per-node 2`: the agent's own SIGTERM to the other
    rank lands past its render (often during the interpreter's finalization, where Python puts its
    handlers back to the default): torchrun's report must show 143 for both, never a signal death.
    (torchrun itself exits 1 whenever a worker exits non-zero.) Two tries, each a new race
    (tests/test_chaos.py signals torchrun ranks twice more)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    for attempt in range(2):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        env = dict(_base_env(), MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", SIGNAL="TERM",
                   SIGNAL_RANK=str(attempt % 2), SIGNAL_AT=str(2 * CALLS_PER_STEP + 1))
        run = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                              str(free_port()), str(HELPER), *_args(folder, "video", "--ulysses", "2",
                                                                     "--set", "output.decode=false")],
                             env=env, capture_output=True, text=True, timeout=300, cwd=folder)
        codes = re.findall(r"^\s+exitcode\s+: (-?\d+)", run.stderr, re.M)  # the report's rows, one per rank
        assert codes == ["143", "143"], (attempt, codes, run.stderr[-3000:])
        assert run.stderr.count("unison: preempted at step 5 of 8;") == 2
