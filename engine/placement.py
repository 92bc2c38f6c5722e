"""Where a rank runs and how ranks talk: one decision, from the config and the environment.

Every launcher (single process, torchrun, srun, Ray) gives the engine a local rank; this module
turns `model.device` plus that local rank into this rank's device, and the device into the
process-group backend, so the backend always follows the device the plan chose:

| model.device | world size | this rank's device                 | backend |
|--------------|------------|------------------------------------|---------|
| auto         | any        | cuda:(local_rank % GPUs) if a GPU, else cpu | nccl / gloo |
| cuda         | any        | cuda:(local_rank % GPUs)           | nccl    |
| cuda:N       | 1          | cuda:N                             | (none)  |
| cuda:N       | > 1        | error: every rank would share GPU N |        |
| cpu          | any        | cpu (gloo even on a GPU host)      | gloo    |

`local_rank % GPUs` is right both when a node's ranks see all its GPUs (torchrun: local rank k
takes GPU k) and when srun or Ray bind one GPU per task through CUDA_VISIBLE_DEVICES (each rank
sees one GPU, index 0).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from dataclasses import dataclass

import torch

from unison.engine.errors import UserError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    """This rank's device (cuda with an index, or cpu)."""
    backend: str
    """Process-group backend for this device: nccl for CUDA, gloo otherwise."""

    @property
    def kind(self) -> str:
        """The device type without an index (what the resolved config records)."""
        return self.device.type


def place(requested: str, *, world_size: int, local_rank: int, gpus: int) -> Placement:
    """This rank's device and backend. `gpus` is torch.cuda.device_count() (0 without CUDA)."""
    if requested == "auto":
        requested = "cuda" if gpus > 0 else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"model.device: not a torch device: {requested!r}") from None
    if device.type != "cuda":
        return Placement(device=device, backend="gloo")
    if gpus == 0:
        raise UserError(f"model.device={requested} but no CUDA GPU is available here (use cpu or auto)")
    if device.index is not None:
        if world_size > 1:
            raise UserError(f"model.device={requested} would put all {world_size} ranks on one GPU; use "
                            f"model.device=cuda (each rank takes GPU local_rank % {gpus})")
        if device.index >= gpus:
            raise UserError(f"model.device={requested} but this machine shows {gpus} GPU(s) (cuda:0..cuda:{gpus - 1})")
        return Placement(device=device, backend="nccl")
    return Placement(device=torch.device("cuda", local_rank % gpus), backend="nccl")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


ATTENTION_PACKAGES = {"flash-attn": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention"),
                      "xfuser": ("xfuser", "xfuser")}
"""Attention backends beyond torch's own sdpa: the module each imports and its pip name."""


def check_attention_backend(name: str, device: torch.device, *, ring: int = 1) -> None:
    """A backend other than sdpa/auto needs a GPU and its packages (xfuser: flash-attn too; sage
    under ring: 2.x): a one-line error otherwise."""
    if name in ("auto", "sdpa"):
        return
    package, pip_name = ATTENTION_PACKAGES[name]
    if device.type != "cuda":
        raise UserError(f"parallel.attention_backend={name} needs a CUDA GPU (this run is on {device}); "
                        f"use sdpa or auto")
    if importlib.util.find_spec(package) is None:
        raise UserError(f"parallel.attention_backend={name} needs the '{pip_name}' package, which is not "
                        f"installed (pip install {pip_name}, or use sdpa)")
    if name == "xfuser" and importlib.util.find_spec("flash_attn") is None:
        # xfuser's long-context attention runs flash-attn's kernels unless told otherwise.
        raise UserError("parallel.attention_backend=xfuser needs the 'flash-attn' package as well (xfuser's "
                        "long-context attention runs its kernels), which is not installed; use sdpa")
    if name == "sage" and ring > 1 and _major_version("sageattention") < 2:
        raise UserError(f"parallel.attention_backend=sage under ring {ring} needs SageAttention 2.x, which "
                        f"returns the log-sum-exp that merges ring chunks; the installed one is "
                        f"{_version('sageattention')} (use ulysses alone, or sdpa / flash-attn)")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "of unknown version"


def _major_version(dist: str) -> int:
    """The distribution's major version; 0 when it is not known (a module without metadata)."""
    head = _version(dist).split(".")[0]
    return int(head) if head.isdigit() else 0


def check_compile(mode: str, device: torch.device) -> None:
    """model.compile=blocks needs TorchDynamo on this Python and a compiler for the device:
    a C++ compiler for the CPU (inductor's C++ backend), Triton for CUDA."""
    if mode == "none":
        return
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError("model.compile=blocks: torch.compile is not supported on this Python/torch build; "
                        "use model.compile=none")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UserError("model.compile=blocks on a GPU needs the 'triton' package, which is not installed; "
                            "use model.compile=none")
    elif not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError("model.compile=blocks on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                        "use model.compile=none")
    from unison.engine.compile_probe import probe

    reason = probe(device.type)  # a compiler that is there but does not work (cached per machine)
    if reason is not None:
        raise UserError(f"model.compile=blocks: torch.compile does not work on this machine's {device.type} "
                        f"toolchain (a tiny program failed: {reason}); fix the compiler or use model.compile=none")
