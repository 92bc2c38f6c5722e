"""What `unison batch` and `unison generate --ray` do, per launcher (the CLI parses, this runs).

Validation comes first everywhere: the run config and every job line are checked (no weights
read) before any process group forms or any model loads.
"""

from __future__ import annotations

import dataclasses

import contextlib
from pathlib import Path

from unison.engine.plan import plan_run
from unison.engine.config import RunConfig
from unison.launch.jobs import Job, Manifest
from unison.engine.errors import Preempted, UserError
from unison.launch.batch import Batch, Ledger, prepare, run_local
from unison.launch.dist import DistEnv


def _exit_code(ledger: Ledger) -> int:
    return 1 if ledger.failed else 0


def batch_local(config: RunConfig, *, jobs: str, out: str, max_retries: int, progress: bool,
                env: DistEnv | None = None, reads: dict[str, str] | None = None) -> int:
    """A single process, or every rank of a torchrun / srun job as one engine. Rank 0 locks the
    folder, reads the jobs and the manifest and hands the list of jobs still to render to the
    other ranks."""
    import torch.distributed as dist

    from unison.engine.worker import Worker
    from unison.launch.failure import FailureWatch

    env = env or DistEnv.detect()
    plan = plan_run(engine_config(config), world_size=env.world_size, local_rank=env.local_rank)
    timeout_s = plan.config.parallel.timeout_s
    with env.joined(timeout_s=timeout_s, placement=plan.placement), contextlib.ExitStack() as owned:
        if env.world_size == 1:
            batch = prepare(jobs, out, base=config, world_size=1, lock=owned, reads=reads)
        else:
            payload: list = [None]
            if env.rank == 0:
                try:
                    payload = [prepare(jobs, out, base=config, world_size=env.world_size, lock=owned, reads=reads)]
                except UserError as err:
                    payload = [str(err)]
            dist.broadcast_object_list(payload, src=0)
            if isinstance(payload[0], str):
                raise UserError(payload[0])
            batch = payload[0]
        ledger = Ledger(Manifest(out), batch, max_retries=max_retries, progress=progress) if env.rank == 0 else None
        try:
            if batch.todo:  # a finished batch loads nothing
                with FailureWatch.from_env(rank=env.rank, world_size=env.world_size, timeout_s=timeout_s):
                    run_local(ledger, batch.todo,
                              worker=Worker(plan, on_progress=ledger.show if ledger is not None else None))
        except Preempted:
            if ledger is not None:
                ledger.close()
                print(ledger.summary())  # what this run did; the CLI then says it was preempted
            raise
        finally:
            if ledger is not None:
                ledger.close()
    if ledger is None:
        return 0
    print(ledger.summary())
    return _exit_code(ledger)


def _ray_run(config: RunConfig, batch: Batch, ledger: Ledger, *, address: str, engines: int | None,
             ranks: int, progress: bool) -> None:
    from unison.launch.ray_batch import RayBatch, connect, options_for_cluster

    connect(address, ranks=(engines or 1) * ranks)
    options = options_for_cluster(engines=engines, ranks_per_engine=ranks)
    RayBatch(config, options, progress=progress).run(batch.todo, ledger)


def _engine_plan(config: RunConfig, ranks_per_engine: int | None):
    """One engine's plan; its world size is --ranks-per-engine or the product of the degrees
    (which must multiply to it)."""
    p = config.parallel
    return plan_run(engine_config(config), world_size=ranks_per_engine or p.ulysses * p.ring * p.cfg * p.patch)


def engine_config(config: RunConfig) -> RunConfig:
    """The config a batch's engine is planned with: an image-to-video batch's jobs bring their own
    pictures (each job is checked with its own), so a picture stands in for the command line's."""
    from unison.engine.plan import _resolve_family
    from unison.engine.images import stand_in_picture
    from unison.engine.models import get_spec

    spec = get_spec(_resolve_family(config.model)[0])
    return dataclasses.replace(config, sampling=stand_in_picture(config.sampling, spec))


def batch_on_ray(config: RunConfig, *, jobs: str, out: str, address: str, engines: int | None,
                 ranks_per_engine: int | None, max_retries: int, progress: bool,
                 reads: dict[str, str] | None = None) -> int:
    """The driver locks the folder and reads the batch before Ray starts: a finished batch
    returns at once, connecting to nothing."""
    ranks = _engine_plan(config, ranks_per_engine).world_size
    with contextlib.ExitStack() as owned:
        batch = prepare(jobs, out, base=config, world_size=ranks, lock=owned, reads=reads)
        ledger = Ledger(Manifest(out), batch, max_retries=max_retries, progress=progress)
        try:
            if batch.todo:
                _ray_run(config, batch, ledger, address=address, engines=engines, ranks=ranks, progress=progress)
        except Preempted:
            ledger.close()
            print(ledger.summary())  # what this run did; the CLI then says it was preempted
            raise
        finally:
            ledger.close()
    print(ledger.summary())
    return _exit_code(ledger)


def generate_on_ray(config: RunConfig, *, address: str, ranks_per_engine: int | None, dry_run: bool) -> int:
    """One video on one Ray engine: a batch of one through the same driver (no manifest)."""
    plan = _engine_plan(config, ranks_per_engine)
    ranks = plan.world_size
    if dry_run:
        print("\n".join(plan.describe()) + f"\nray        1 engine x {ranks} ranks at {address}")
        return 0
    job = Job(id=Path(plan.config.output.path).stem, line=0, config=plan.config)
    batch = Batch(todo=[job], attempts={}, skipped=0, total=1, problems=[])
    ledger = Ledger(None, batch, max_retries=0, progress=plan.config.output.progress)
    try:
        _ray_run(config, batch, ledger, address=address, engines=1, ranks=ranks,
                 progress=plan.config.output.progress)
    finally:
        ledger.close()
    print(ledger.summary() + (f"\nwrote     {plan.config.output.path}" if ledger.done else ""))
    return _exit_code(ledger)
