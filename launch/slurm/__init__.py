"""`unison slurm`: fill one of the sbatch templates beside this file.

torchrun.sbatch: `srun torchrun` on every node, one engine over all the allocation's GPUs (the
parallel degrees in the config must multiply to nodes x GPUs per node). ray.sbatch: a Ray cluster
inside the allocation and `unison batch --ray auto`, engines of --ranks-per-engine GPUs each.
Ranks started by srun without torchrun read SLURM_PROCID and friends (launch/dist.py).

Every value is checked before a script is printed, and the recipe is planned (as --dry-run does)
for the world size the script will run it at. What goes into shell lines is quoted (shlex); the
#SBATCH lines are read by sbatch itself, which knows double quotes and backslashes but not the
shell's single quotes and takes an unquoted '#' for a comment, so their values are held to
characters that need no quoting at all.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from unison.engine.plan import plan_run
from unison.engine.targets import check_batch_output
from unison.engine.config import RunConfig
from unison.engine.errors import UserError

TEMPLATES = Path(__file__).resolve().parent
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+(?::[0-9]+){0,2})")
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
DEFAULT_OUT = "videos"
"""The batch's folder when --out is not given."""


@dataclass(frozen=True, kw_only=True)
class SlurmRequest:
    mode: str
    config: str
    nodes: int
    gpus_per_node: int
    cpus_per_gpu: int = 8
    jobs: str | None = None
    out: str | None = None
    ranks_per_engine: int | None = None
    partition: str | None = None
    time: str = "04:00:00"
    job_name: str = "unison"


def _command(r: SlurmRequest) -> str:
    config = ["--config", r.config]
    if r.jobs is not None:
        return shlex.join(["batch", r.jobs, "--out", r.out or DEFAULT_OUT, *config])
    return shlex.join(["generate", *config])


def check_time(text: str) -> None:
    """Slurm's --time formats; minutes and seconds below 60, and hours below 24 after a day count."""
    match = _TIME.fullmatch(text)
    fields = match.group(2).split(":") if match else []
    if match and match.group(1) is not None:
        limits = (24, 60, 60)  # D-HH[:MM[:SS]]
    else:
        limits = {1: (None,), 2: (None, 60), 3: (None, 60, 60)}.get(len(fields), ())  # MM, MM:SS, HH:MM:SS
    if not match or any(limit is not None and int(field) >= limit for field, limit in zip(fields, limits)):
        raise UserError(f"--time must be {TIME_FORMATS} (minutes and seconds below 60, hours below 24 "
                        f"after days), got {text!r}")


def check_request(r: SlurmRequest) -> None:
    """Every value of the request, before the recipe is read."""
    for flag, value in (("--nodes", r.nodes), ("--gpus-per-node", r.gpus_per_node), ("--cpus-per-gpu", r.cpus_per_gpu),
                        ("--ranks-per-engine", r.ranks_per_engine)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not _JOB_NAME.fullmatch(r.job_name):
        raise UserError(f"--job-name must be 1-128 letters, digits, '.', '_', '+' or '-' (starting with a letter "
                        f"or digit), got {r.job_name!r}")
    if r.partition is not None and not _PARTITION.fullmatch(r.partition):
        raise UserError(f"--partition must be a partition name (letters, digits, '.', '_', '-'), or several "
                        f"separated by commas, got {r.partition!r}")
    check_time(r.time)
    if r.mode == "ray" and r.jobs is None:
        raise UserError("--mode ray runs a batch: give --jobs (and --out)")
    if r.out is not None and r.jobs is None:
        raise UserError("--out is the batch's folder: give --jobs too")
    if r.mode == "torchrun" and r.ranks_per_engine is not None:
        raise UserError("--ranks-per-engine is for --mode ray; under torchrun every GPU of the allocation "
                        "is one engine")


def render_script(r: SlurmRequest, config: RunConfig) -> str:
    """The filled script; `config` is the recipe r.config names, loaded. It is planned as
    --dry-run plans it, at the world size it will run at (every GPU under torchrun, one engine
    under Ray), on a node of r.gpus_per_node GPUs, so a bad recipe fails here and not in the queue."""
    check_request(r)
    p = config.parallel
    degrees = p.ulysses * p.ring * p.cfg * p.patch
    gpus = r.nodes * r.gpus_per_node
    if r.mode == "torchrun" and degrees != gpus:
        raise UserError(f"{r.config}: parallel degrees multiply to {degrees}, but {r.nodes} nodes x "
                        f"{r.gpus_per_node} GPUs make {gpus} ranks (set parallel.* to match)")
    ranks = r.ranks_per_engine or degrees
    if r.mode == "ray" and gpus % ranks:
        raise UserError(f"{gpus} GPUs do not split into engines of {ranks}")
    try:
        plan_run(config, world_size=gpus if r.mode == "torchrun" else ranks, gpus=r.gpus_per_node)
        if r.jobs is not None:
            check_batch_output(r.out or DEFAULT_OUT, config)
    except UserError as err:
        raise UserError(f"{r.config}: {err}") from None
    values = {
        "JOB_NAME": r.job_name, "NODES": str(r.nodes), "GPUS_PER_NODE": str(r.gpus_per_node),
        "CPUS_PER_TASK": str(r.cpus_per_gpu * r.gpus_per_node), "TIME": r.time,
        "PARTITION": f"#SBATCH --partition={r.partition}" if r.partition else "",
        "COMMAND": _command(r), "RANKS_PER_ENGINE": str(ranks),
    }
    text = (TEMPLATES / f"{r.mode}.sbatch").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text
