"""DistEnv: what a launcher hands the engine (rank, world size, rendezvous, device)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str = "env://"

    @classmethod
    def from_env(cls) -> "DistEnv":
        """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
        return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    def init(self, *, timeout_s: float) -> None:
        """Join the process group: NCCL when this rank has a GPU, gloo on the CPU; always a timeout."""
        if self.world_size == 1 or dist.is_initialized():
            return
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend, init_method=self.init_method, rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s))
