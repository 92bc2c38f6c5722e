"""Which device each rank takes and which backend its process group uses, from the config and
the environment (engine/placement.py, launch/dist.py), and that a run leaves no group behind."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unison.engine.plan import plan_run
from unison.engine.config import ModelConfig, ParallelConfig, RunConfig
from unison.engine.placement import Placement, place
from unison.engine.errors import UserError
from unison.launch.dist import DistEnv

from multirank import free_port

# (model.device, world size, local rank, visible GPUs) -> (device, backend)
TABLE = [
    ("auto", 1, 0, 0, "cpu", "gloo"),
    ("auto", 4, 3, 0, "cpu", "gloo"),
    ("auto", 1, 0, 8, "cuda:0", "nccl"),
    ("auto", 8, 5, 8, "cuda:5", "nccl"),             # torchrun: local rank k takes GPU k
    ("cuda", 2, 1, 2, "cuda:1", "nccl"),
    ("cuda", 4, 2, 1, "cuda:0", "nccl"),              # srun / Ray bind one GPU per task
    ("cpu", 4, 1, 8, "cpu", "gloo"),                  # the CPU on a GPU host: gloo, never nccl
    ("cuda:3", 1, 0, 8, "cuda:3", "nccl"),
]


@pytest.mark.parametrize("requested,world,local,gpus,device,backend", TABLE)
def test_placement_table(requested, world, local, gpus, device, backend):
    assert place(requested, world_size=world, local_rank=local, gpus=gpus) == Placement(
        device=torch.device(device), backend=backend)


ERRORS = [
    ("cuda", 1, 0, 0, "no CUDA GPU is available"),
    ("cuda:1", 2, 0, 8, "would put all 2 ranks on one GPU"),
    ("cuda:8", 1, 0, 8, "shows 8 GPU(s)"),
    ("gpu", 1, 0, 8, "not a torch device"),
]


@pytest.mark.parametrize("requested,world,local,gpus,message", ERRORS)
def test_placement_errors(requested, world, local, gpus, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        place(requested, world_size=world, local_rank=local, gpus=gpus)


def test_plan_records_the_device_type_for_many_ranks():
    """A multi-rank plan keeps its own rank's GPU but records only "cuda", so the saved config
    can be rerun on any rank count; a one-rank run pinned to a GPU records that GPU."""
    config = RunConfig(model=ModelConfig(family="wan", device="cuda"), parallel=ParallelConfig(ulysses=2))
    plan = plan_run(config, world_size=2, local_rank=1, gpus=2)
    assert plan.device == torch.device("cuda", 1) and plan.placement.backend == "nccl"
    assert plan.config.model.device == "cuda"
    pinned = plan_run(RunConfig(model=ModelConfig(family="wan", device="cuda:1")), gpus=2)
    assert pinned.config.model.device == "cuda:1"
    with pytest.raises(UserError, match="would put all 2 ranks on one GPU"):
        plan_run(RunConfig(model=ModelConfig(family="wan", device="cuda:1"), parallel=ParallelConfig(ulysses=2)),
                 world_size=2, gpus=2)


@pytest.mark.parametrize("placement,backend,device_id", [
    (Placement(device=torch.device("cpu"), backend="gloo"), "gloo", None),
    (Placement(device=torch.device("cuda", 1), backend="nccl"), "nccl", torch.device("cuda", 1)),
])
def test_init_follows_the_placement(monkeypatch, placement, backend, device_id):
    """DistEnv.init takes the backend from the plan's device, even on a host that has GPUs (the
    old rule, nccl whenever CUDA is available, put CPU runs on NCCL), sets the current GPU and
    passes it as device_id."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("current", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, device_id=kw.get("device_id"),
                                                          timeout=kw["timeout"]))
    env = DistEnv(rank=1, world_size=2, local_rank=1, source="torchrun")
    assert env.init(timeout_s=42, placement=placement)
    assert seen["backend"] == backend and seen["device_id"] == device_id
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert seen.get("current") == device_id


def _join_and_leave(rank: int, port: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    env = DistEnv(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, source="single")
    inside = None
    try:
        with env.joined(timeout_s=60, placement=Placement(device=torch.device("cpu"), backend="gloo")):
            inside = dist.get_backend()
            raise RuntimeError("the run fails")
    except RuntimeError:
        pass
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{inside} {dist.is_initialized()}")


def test_a_run_destroys_its_process_group_even_when_it_fails(tmp_path):
    mp.start_processes(_join_and_leave, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["gloo False"] * 2


@pytest.mark.parametrize("family, parallel, message", [
    ("hunyuanvideo", ParallelConfig(attention_backend="xfuser"), "xfuser runs exact sequence parallelism"),
    ("wan", ParallelConfig(attention_backend="xfuser", patch=2), "xfuser runs exact sequence parallelism"),
    ("wan", ParallelConfig(attention_backend="flash-attn"), None),
])
def test_attention_backend_rules_on_a_gpu_host(monkeypatch, family, parallel, message):
    """As a GPU host with every package installed would see it (find_spec faked): xfuser only for
    exact sequence parallelism on Wan; flash-attn accepted."""
    import unison.engine.placement as placement

    monkeypatch.setattr(placement.importlib.util, "find_spec", lambda name: object())
    config = RunConfig(model=ModelConfig(family=family, device="cuda"), parallel=parallel)
    world = parallel.patch
    if message is None:
        assert plan_run(config, world_size=world, gpus=world).placement.backend == "nccl"
    else:
        with pytest.raises(UserError, match=message):
            plan_run(config, world_size=world, gpus=world)


def test_missing_attention_package_is_named(monkeypatch):
    import unison.engine.placement as placement

    monkeypatch.setattr(placement.importlib.util, "find_spec", lambda name: None)
    config = RunConfig(model=ModelConfig(family="wan", device="cuda"),
                       parallel=ParallelConfig(attention_backend="sage"))
    with pytest.raises(UserError, match="needs the 'sageattention' package"):
        plan_run(config, gpus=1)


@pytest.mark.parametrize("parallel, missing, version, message", [
    (ParallelConfig(attention_backend="xfuser"), "flash_attn", None, "xfuser needs the 'flash-attn' package as well"),
    (ParallelConfig(attention_backend="sage", ring=2), None, "1.0.6",
     "sage under ring 2 needs SageAttention 2.x, .* the installed one is 1.0.6"),
    (ParallelConfig(attention_backend="sage", ring=2), None, "2.2.0", None),
    (ParallelConfig(attention_backend="sage", ulysses=2), None, "1.0.6", None),
], ids=["xfuser-without-flash-attn", "sage-1-ring", "sage-2-ring", "sage-1-ulysses"])
def test_attention_packages_are_checked_as_the_index_ships_them(monkeypatch, parallel, missing, version, message):
    """xfuser's long-context attention runs flash-attn's kernels; SageAttention 1.x silently
    ignores return_lse, so ring attention needs 2.x: refused at plan time, one line."""
    import unison.engine.placement as placement

    monkeypatch.setattr(placement.importlib.util, "find_spec", lambda name: None if name == missing else object())
    monkeypatch.setattr(placement.importlib.metadata, "version", lambda dist: version)
    config = RunConfig(model=ModelConfig(family="wan", device="cuda"), parallel=parallel)
    world = parallel.ring * parallel.ulysses
    if message is None:
        assert plan_run(config, world_size=world, gpus=world).placement.backend == "nccl"
    else:
        with pytest.raises(UserError, match=message):
            plan_run(config, world_size=world, gpus=world)
