"""Run a function on N gloo ranks (CPU, loopback, finite timeout) and collect every rank's result.

Starting a rank costs seconds (a spawned interpreter importing torch, diffusers and
transformers), more than most multi-rank cases take to run. So the ranks are a pool of spawned
worker processes started once per test session and shared by every multi-rank test: each call
of `run_ranks(world, fn, ...)` gives workers 0..world-1 a fresh process group (new port, gloo,
finite timeout) for that one call, and destroys it afterwards. Between calls a worker restores
its RNG state, so a case never depends on what ran before it. A worker that dies or stops
answering is replaced, the call failing with every rank's report. `UNISON_TEST_POOL=0` spawns
fresh processes per call instead (the old behaviour, for debugging).
"""

from __future__ import annotations

import atexit
import datetime
import io
import os
import queue
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

TIMEOUT_S = 60
POOL_SIZE = 4
"""The most ranks any test uses."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _call(rank: int, world: int, port: int, fn, args) -> tuple[bool, bytes | str]:
    """(True, the result serialised by torch.save) or (False, the traceback)."""
    try:
        _join(rank, world, port)
        try:
            result = fn(rank, world, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        return True, buffer.getvalue()
    except BaseException:
        return False, traceback.format_exc()


def _worker(rank: int, tasks, results) -> None:
    torch.set_num_threads(1)
    rng = torch.get_rng_state()
    while True:
        task = tasks.get()
        if task is None:
            return
        world, port, fn, args = task
        torch.set_rng_state(rng)
        results.put((rank, *_call(rank, world, port, fn, args)))


class _Pool:
    def __init__(self, size: int):
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, self.tasks[r], self.results), daemon=True)
                      for r in range(size)]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    def run(self, world: int, fn, args) -> tuple[dict, bool]:
        """Every rank's (ok, payload); False as second item if a worker died or hung."""
        port = free_port()
        for r in range(world):
            self.tasks[r].put((world, port, fn, args))
        replies: dict[int, tuple[bool, bytes | str]] = {}
        # A rank whose peer failed stops at the latest when its collective times out.
        deadline_s, waited = 3 * TIMEOUT_S + 60, 0.0
        while len(replies) < world:
            try:
                rank, ok, payload = self.results.get(timeout=1.0)
                replies[rank] = (ok, payload)
                continue
            except queue.Empty:
                waited += 1.0
            dead = [r for r in range(world) if not self.procs[r].is_alive() and r not in replies]
            if dead or waited > deadline_s:
                for r in range(world):
                    replies.setdefault(r, (False, "worker died" if r in dead else "worker did not answer"))
                return replies, False
        return replies, True


_pool: _Pool | None = None


def _shared_pool() -> _Pool:
    global _pool
    if _pool is None:
        _pool = _Pool(POOL_SIZE)
        atexit.register(lambda: _pool is not None and _pool.close())
    return _pool


def _spawned(world: int, fn, args) -> list:
    """One fresh process per rank (UNISON_TEST_POOL=0)."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_spawn_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                               join=True, start_method="spawn")
        except ProcessException as err:
            reports = [f"--- rank {r} ---\n" + open(path).read() for r in range(world)
                       if os.path.exists(path := os.path.join(out_dir, f"rank{r}.err"))]
            raise AssertionError("\n".join([str(err), *reports])) from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _spawn_entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    ok, payload = _call(rank, world, port, fn, args)
    if not ok:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(payload)
        raise RuntimeError(f"rank {rank} failed")
    with open(os.path.join(out_dir, f"rank{rank}.pt"), "wb") as f:
        f.write(payload)


def run_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns every rank's result, in rank order.
    A failure on any rank fails the call with every failed rank's own traceback (a rank that
    died of a lost peer would otherwise hide the rank that caused it)."""
    global _pool
    if os.environ.get("UNISON_TEST_POOL", "1") == "0" or world > POOL_SIZE:
        return _spawned(world, fn, args)
    replies, healthy = _shared_pool().run(world, fn, args)
    if not healthy:
        _pool.close()
        _pool = None
    failed = [f"--- rank {r} ---\n{payload}" for r, (ok, payload) in sorted(replies.items()) if not ok]
    if failed:
        raise AssertionError(f"{len(failed)} of {world} ranks failed\n" + "\n".join(failed))
    return [torch.load(io.BytesIO(replies[r][1]), weights_only=False) for r in range(world)]


def render_each(rank, world, configs):
    """For run_ranks: every config rendered by an engine of its own on this rank; (latents, cache
    decisions) per config."""
    from unison.engine.render import Engine

    out = []
    for config in configs:
        result = Engine.from_config(config, world_size=world).render()
        out.append((result.latents, result.cache_decisions))
    return out
