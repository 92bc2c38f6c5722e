"""A rank that raises mid-run ends the run on every rank within seconds, and the survivors'
error names it (ranks launched one process each, as srun or Ray would, no torchrun agent)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multirank import free_port

SCRIPT = Path(__file__).with_name("failing_rank.py")
TIMEOUT_S = 120  # the process groups' timeout; the run must end long before it


@pytest.mark.parametrize("fail_rank", [1, 0], ids=["rank1-fails", "rank0-fails-store-host"])
def test_failed_rank_is_named_and_nobody_hangs(tmp_path, fail_rank):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
               WORLD_SIZE="2", FAIL_RANK=str(fail_rank), OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), "--ulysses", "2", "--steps", "3", "--output", str(tmp_path / "v.mp4"),
            "--set", f"parallel.timeout_s={TIMEOUT_S}"]
    started = time.monotonic()
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    elapsed = time.monotonic() - started
    survivor = 1 - fail_rank
    failed_err, survivor_err = outputs[fail_rank][1], outputs[survivor][1]
    assert procs[fail_rank].returncode != 0
    assert "injected failure in a transformer block" in failed_err
    assert procs[survivor].returncode == 1, survivor_err[-2000:]
    last = survivor_err.strip().splitlines()[-1]
    assert last.startswith(f"unison: error: rank {fail_rank} failed: RuntimeError: injected failure"), last
    assert f"rank {survivor}" in last
    assert elapsed < 45, f"took {elapsed:.0f} s"
    assert not (tmp_path / "v.mp4").exists()


STUCK = """
import time, torch.distributed as dist
from unison.launch.failure import FailureWatch
store = dist.HashStore()
with FailureWatch(store, rank=0, world_size=2, poll_s=0.05, grace_s=0.5):
    store.set("message", "rank 1 failed: RuntimeError: boom")
    time.sleep(60)  # stands for a collective that never returns (NCCL does not notice dead peers)
"""


def test_rank_stuck_in_a_collective_exits_naming_the_failed_rank():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "unison: error: rank 1 failed: RuntimeError: boom (rank 0 was stuck in a collective and exits)")
    assert time.monotonic() - started < 30


def test_rank_killed_outright_is_named_by_the_survivor(tmp_path):
    """Issue 15: a rank SIGKILLed mid-run publishes nothing; the survivor, whose collective fails,
    finds it silent (no heartbeat) and names it in one line, exit 1, within seconds."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
               WORLD_SIZE="2", FAIL_RANK="1", FAIL_MODE="kill", OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), "--ulysses", "2", "--steps", "3", "--output", str(tmp_path / "v.mp4"),
            "--set", f"parallel.timeout_s={TIMEOUT_S}"]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    killed_rc = procs[1].wait(timeout=TIMEOUT_S)
    killed_at = time.monotonic()
    _, survivor_err = procs[0].communicate(timeout=TIMEOUT_S)
    assert killed_rc == -9
    assert procs[0].returncode == 1, survivor_err[-2000:]
    assert survivor_err.strip().splitlines()[-1] == (
        "unison: error: rank 1 failed: no longer responding (killed?) (rank 0 stopped because of it)")
    assert time.monotonic() - killed_at < 20, "the survivor took too long to give up"
    assert not (tmp_path / "v.mp4").exists()


SILENT = """
import time, torch.distributed as dist
from unison.launch.failure import FailureWatch
store = dist.HashStore()
store.add("beat/1", 1)  # rank 1 beat once, then went silent (killed)
store.add("beat/2", 1)
store.set("left/2", "1")  # rank 2 ended its work normally: not watched
with FailureWatch(store, rank=0, world_size=3, poll_s=0.05, grace_s=0.5, stale_s=1.0):
    time.sleep(60)  # stands for an NCCL collective waiting on the dead rank
"""


def test_silent_rank_is_named_by_the_watcher():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SILENT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("unison: error: rank 1 failed: no longer responding (killed?) "
                                                    "(rank 0 was stuck in a collective and exits)")
    assert time.monotonic() - started < 30
