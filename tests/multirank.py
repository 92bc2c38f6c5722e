"""Run a function on N gloo ranks (CPU, loopback, finite timeout) and collect what rank 0 returns."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on `world` spawned processes; returns every rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                               join=True, start_method="spawn")
        except ProcessException as err:
            # Every rank's own traceback, not only the first one to fail: a rank that died of a
            # lost peer hides the rank that caused it.
            reports = [f"--- rank {r} ---\n" + open(path).read() for r in range(world)
                       if os.path.exists(path := os.path.join(out_dir, f"rank{r}.err"))]
            raise AssertionError("\n".join([str(err), *reports])) from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
