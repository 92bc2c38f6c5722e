"""`unison slurm`: fill one of the sbatch templates beside this file.

torchrun.sbatch: `srun torchrun` on every node, one engine over all the allocation's GPUs (the
parallel degrees in the config must multiply to nodes x GPUs per node). ray.sbatch: a Ray cluster
inside the allocation and `unison batch --ray auto`, engines of --ranks-per-engine GPUs each.
Ranks started by srun without torchrun read SLURM_PROCID and friends (launch/dist.py).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from unison.engine.config import RunConfig
from unison.errors import UserError

TEMPLATES = Path(__file__).resolve().parent


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
        return shlex.join(["batch", r.jobs, "--out", r.out or "videos", *config])
    return shlex.join(["generate", *config])


def render_script(r: SlurmRequest, config: RunConfig) -> str:
    """The filled script; `config` is the recipe r.config names, loaded (its degrees are checked)."""
    if r.nodes < 1 or r.gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus-per-node must be at least 1, got {r.nodes} and {r.gpus_per_node}")
    if r.mode == "ray" and r.jobs is None:
        raise UserError("--mode ray runs a batch: give --jobs (and --out)")
    if r.out is not None and r.jobs is None:
        raise UserError("--out is the batch's folder: give --jobs too")
    p = config.parallel
    degrees = p.ulysses * p.ring * p.cfg * p.patch
    gpus = r.nodes * r.gpus_per_node
    if r.mode == "torchrun" and degrees != gpus:
        raise UserError(f"{r.config}: parallel degrees multiply to {degrees}, but {r.nodes} nodes x "
                        f"{r.gpus_per_node} GPUs make {gpus} ranks (set parallel.* to match)")
    ranks = r.ranks_per_engine or degrees
    if r.mode == "ray" and gpus % ranks:
        raise UserError(f"{gpus} GPUs do not split into engines of {ranks}")
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
