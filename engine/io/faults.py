"""A fault injector for tests of preemption and recovery: off unless UNISON_FAULTS is set.

Nothing here runs in a user's render: without the variable `active()` is False, the engine
installs nothing, and the one call the engine makes per phase returns at once.

UNISON_FAULTS is a JSON list of faults, each {"job": ID, "step": S, "action": A, "rank": R}:
- `job`: the video's file stem (a batch job's id; "*": every job, e.g. a service's, whose ids the
  server makes); `step`: the 0-based index of the denoising step
  as it begins (S steps are finished); `rank`: the engine rank that acts (null: every rank);
- `action`: "kill" (the process SIGKILLs itself: a lost node, an OOM kill), "raise" (an
  InjectedFault, a retryable RuntimeError), or "signal-driver" (SIGTERM to the process that
  launched the render: the Ray driver, named by UNISON_FAULTS_DRIVER, else the parent process,
  which is torchrun's agent under torchrun), or "pause" (wait until the file named by the fault's
  "until" exists, at most 120 s: a test holds a render at a step while it does something else).
UNISON_FAULTS_DIR is a folder for its bookkeeping: each fault fires once per rank (a marker file
created exclusively there, so a retried or resumed job passes the same step), and every
denoising step a rank finishes is appended to `steps.log` as "job rank": the independent
count of the steps computed, taken from the scheduler's own step calls, not from the engine's
progress reports.

`draw(seed, jobs, steps, every)` picks the faults of the chaos test from a seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

ENV = ("UNISON_FAULTS", "UNISON_FAULTS_DIR", "UNISON_FAULTS_DRIVER")
"""What a driver forwards to the processes it starts (Ray actors)."""
STEP_LOG = "steps.log"


class InjectedFault(RuntimeError):
    """The "raise" action's error (retryable, as a CUDA or NCCL fault would be)."""


def active() -> bool:
    return bool(os.environ.get("UNISON_FAULTS"))


def forwarded_env() -> dict[str, str]:
    """The injector's variables for processes a driver starts; names this process the driver."""
    if not active():
        return {}
    env = {k: os.environ[k] for k in ENV if k in os.environ}
    env.setdefault("UNISON_FAULTS_DRIVER", str(os.getpid()))
    return env


def _faults() -> list[dict]:
    return json.loads(os.environ["UNISON_FAULTS"])


def _folder() -> Path:
    return Path(os.environ["UNISON_FAULTS_DIR"])


def watch(scheduler, *, rank: int, job) -> None:
    """Log every step `scheduler` finishes (job() names the video rendering) to steps.log. The
    instance gets a subclass of its class: its __dict__ (what step checkpoints save) is unchanged."""
    if not active():
        return
    cls = type(scheduler)
    log = _folder() / STEP_LOG

    def step(self, *args, **kwargs):
        out = cls.step(self, *args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{job()} {rank}\n")
        return out

    scheduler.__class__ = type(cls.__name__, (cls,), {"step": step})


def at_step(job: str, index: int, *, rank: int) -> None:
    """Called as step `index` of `job` begins on `rank`: carry out the faults due here."""
    if not active():
        return
    for number, fault in enumerate(_faults()):
        if fault["job"] not in (job, "*") or fault["step"] != index or fault.get("rank") not in (None, rank):
            continue
        try:  # once per fault and rank, whichever attempt gets there first
            os.close(os.open(_folder() / f"fired.{number}.rank{rank}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        action = fault["action"]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise InjectedFault(f"injected fault {number} at step {index} of job {job}")
        elif action == "pause":
            gate, deadline = Path(fault["until"]), time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif action == "signal-driver":
            os.kill(int(os.environ.get("UNISON_FAULTS_DRIVER") or os.getppid()), signal.SIGTERM)
        else:
            raise ValueError(f"UNISON_FAULTS: unknown action {action!r}")


def steps_computed(folder: str | Path) -> dict[str, dict[int, int]]:
    """From steps.log: job -> rank -> steps finished (every attempt together)."""
    counts: dict[str, dict[int, int]] = {}
    path = Path(folder) / STEP_LOG
    for line in path.read_text().splitlines() if path.exists() else []:
        job, rank = line.split()
        per_rank = counts.setdefault(job, {})
        per_rank[int(rank)] = per_rank.get(int(rank), 0) + 1
    return counts


def draw(seed: int, jobs: list[str], *, steps: int, every: int, ranks: int = 2) -> list[dict]:
    """The chaos test's four faults, placed by `seed`: a rank killed mid-job, a job that raises on
    every rank, SIGTERM to the driver, and a second kill in the job whose rank was killed, at a
    step past the first kill's last checkpoint (so it lands in the resumed attempt)."""
    rng = random.Random(seed)
    killed, raising, signalled = rng.sample(jobs, 3)
    first = rng.randrange(every + 1, steps - every)  # past a checkpoint: the resume skips steps
    second = rng.randrange(first + 1, steps)
    return [
        {"job": killed, "step": first, "action": "kill", "rank": rng.randrange(ranks)},
        {"job": raising, "step": rng.randrange(1, steps), "action": "raise", "rank": None},
        {"job": signalled, "step": rng.randrange(1, steps - 2), "action": "signal-driver", "rank": 0},
        {"job": killed, "step": second, "action": "kill", "rank": rng.randrange(ranks)},
    ]
