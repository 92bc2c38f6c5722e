"""DistEnv: what a launcher hands the engine (rank, world size, rendezvous address, device).

Every launcher produces one: torchrun through its environment variables (`from_torchrun`),
Slurm's srun through SLURM_* (`from_slurm`: one task per GPU, rendezvous on the first node of the
allocation), Ray by constructing it for each actor (launch/ray_batch.py). `detect()` picks the
first that applies, torchrun's variables taking precedence (srun torchrun sets both).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from unison.engine.placement import Placement
from unison.engine.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"
    """Which launcher this came from: single, torchrun, slurm or ray."""

    @property
    def init_method(self) -> str:
        # Under torchrun, env:// joins the agent's own store (tcp:// would try to host a second one
        # on the same port); everywhere else rank 0 hosts the store at master_addr:master_port.
        return "env://" if self.source == "torchrun" else f"tcp://{self.master_addr}:{self.master_port}"

    @classmethod
    def from_torchrun(cls, environ: Mapping[str, str] = os.environ) -> "DistEnv":
        """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
        return cls(rank=int(environ.get("RANK", 0)), world_size=int(environ.get("WORLD_SIZE", 1)),
                   local_rank=int(environ.get("LOCAL_RANK", 0)),
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)), source="torchrun")

    @classmethod
    def from_slurm(cls, environ: Mapping[str, str] = os.environ) -> "DistEnv":
        """srun's variables: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST (the
        first node hosts the rendezvous). MASTER_ADDR / MASTER_PORT win when set; otherwise the
        port is derived from the job id, so two jobs sharing a node do not collide."""
        try:
            rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
        except KeyError as err:
            raise UserError(f"not inside a Slurm job step: {err.args[0]} is not set") from None
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
        addr = environ.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        port = environ.get("MASTER_PORT") or str(DEFAULT_PORT + int(environ.get("SLURM_JOB_ID", 0)) % 20000)
        return cls(rank=rank, world_size=world, local_rank=int(environ.get("SLURM_LOCALID", 0)),
                   master_addr=addr, master_port=int(port), source="slurm")

    @classmethod
    def detect(cls, environ: Mapping[str, str] = os.environ) -> "DistEnv":
        if "WORLD_SIZE" in environ:
            return cls.from_torchrun(environ)
        if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", 1)) > 1:
            return cls.from_slurm(environ)
        return cls()

    def export(self) -> None:
        """Set MASTER_ADDR / MASTER_PORT for code that reads them (the failure watch's store)."""
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = self.master_addr, str(self.master_port)

    def init(self, *, timeout_s: float, placement: Placement) -> bool:
        """Join the process group with the backend that follows this rank's device (NCCL for a
        CUDA device, which becomes this process's current device and the group's `device_id`;
        gloo otherwise, also on a GPU host); always a timeout. True if this call created it."""
        if self.world_size == 1 or dist.is_initialized():
            return False
        extra = {}
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)
            extra["device_id"] = placement.device
        if self.source != "torchrun":
            self.export()
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self._torchrun_round_store(timeout)
        where = {"store": store} if store is not None else {"init_method": self.init_method}
        dist.init_process_group(placement.backend, rank=self.rank, world_size=self.world_size, timeout=timeout,
                                **where, **extra)
        return True

    def _torchrun_round_store(self, timeout: datetime.timedelta):
        """Under torchrun whose agent hosts the store (TORCHELASTIC_USE_AGENT_STORE), that store
        outlives a restart (--max-restarts; the static rendezvous of --master-addr/--master-port
        keeps one for the whole job), and the keys a failed round left there (every rank's gloo or
        NCCL address) would send the restarted ranks to processes that are gone: they hang until
        the timeout. Each round (TORCHELASTIC_RESTART_COUNT) gets a prefix of its own. None: env://."""
        if self.source != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
            return None
        agent = dist.TCPStore(self.master_addr, self.master_port, self.world_size, is_master=False, timeout=timeout)
        return dist.PrefixStore(f"unison/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)

    @contextlib.contextmanager
    def joined(self, *, timeout_s: float, placement: Placement) -> Iterator[None]:
        """The process group for the length of a run: joined on entry, destroyed on exit (also on
        an error), unless it existed before."""
        created = self.init(timeout_s=timeout_s, placement=placement)
        try:
            yield
        finally:
            if created and dist.is_initialized():
                dist.destroy_process_group()


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,7],login1") -> ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            hosts.extend(f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return hosts
