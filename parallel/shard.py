"""Sharding a transformer's block weights across ranks with torch's own FSDP2 (`fully_shard`).

Each transformer block is its own FSDP unit: its parameters become DTensors sharded on dim 0
over a 1-D mesh, a forward pre-hook all-gathers them just before the block runs, and a forward
hook frees the gathered copy right after (reshard_after_forward=True), so a rank holds about
1/N of the block weights plus, while the forward runs, the whole weights of the block it is in
and of the next one (prefetched, so on a GPU its all-gather overlaps the current block's
compute). Parameters keep their dtype (no mixed-precision policy: the engine casts the model
before it gets here). Nothing here needs gradients: under torch.no_grad FSDP2 registers no
backward hooks.

The parameters outside the blocks (patch, text and timestep embeddings, output norm and head)
stay replicated, as plain tensors. They are a few percent of the weights (about 2% of Wan 2.1
14B), and sharding them into a root unit would not lower the peak: the root unit is gathered
before the first block and freed after the head, so its whole weights are held through every
forward anyway, for one more all-gather per forward. The transformer itself still becomes the
FSDP root (with those parameters ignored), because FSDP2 keeps its communication state (streams,
the in-flight all-gather, prefetching) per root: with every block a root of its own, no block
could prefetch the next.

FSDP2 has no undo (its parameters are DTensors and its class swap is not reversible through a
public API), so the sharding stays for the transformer's life and applying it twice is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from unison.parallel.comm import CommStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

_MARK = "_unison_weight_sharding"


def param_bytes(params) -> int:
    """Bytes these parameters hold on this rank: a DTensor's local shard, a tensor's whole size."""
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@dataclass
class ShardedWeights:
    """What apply_weight_sharding did to one transformer, and what it holds on this rank."""

    blocks: list[nn.Module]
    """The sharded blocks (each its own FSDP unit), in execution order."""
    size: int
    """Ranks the blocks are sharded over."""
    full_block_bytes: int
    """The blocks' parameter bytes before sharding (what one rank would hold)."""
    replicated_bytes: int
    """Bytes of the parameters outside the blocks, held whole on every rank."""

    def local_block_bytes(self) -> int:
        """The blocks' parameter bytes this rank holds between forwards (its shards)."""
        return param_bytes(p for block in self.blocks for p in block.parameters())

    def describe(self) -> str:
        mib = 2**20
        return (f"{len(self.blocks)} blocks sharded over {self.size} ranks (FSDP2): block weights "
                f"{self.local_block_bytes() / mib:.2f} MiB per rank of {self.full_block_bytes / mib:.2f} MiB, "
                f"other weights {self.replicated_bytes / mib:.2f} MiB replicated")


def shard_mesh(group: ProcessGroup, *, device_type: str) -> DeviceMesh:
    """A 1-D DeviceMesh ("shard") over an existing process group, so it keeps that group's timeout
    (a mesh that made its own group would get torch's default of 30 minutes)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type, mesh_dim_names=("shard",))


def _device_of(transformer: nn.Module) -> torch.device:
    devices = {p.device for p in transformer.parameters()}
    if len(devices) != 1:
        raise ValueError(f"weight sharding needs the transformer on one device, found {sorted(map(str, devices))}")
    device = devices.pop()
    # FSDP2 takes a CUDA mesh's device to be the current device and would move the weights there.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        raise RuntimeError(f"the transformer is on {device} but this process's current CUDA device is "
                           f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device first")
    return device


def gathered_bytes(block: nn.Module, size: int) -> int:
    """Bytes this rank sends when `block`'s weights are all-gathered over `size` ranks: its dim-0
    shard of every parameter, padded to ceil(rows / size) rows as FSDP2 pads it, to size - 1 ranks."""
    total = 0
    for p in block.parameters():
        rows = p.shape[0] if p.ndim else 1
        total += -(-rows // size) * (p.numel() // max(rows, 1)) * p.element_size()
    return total * (size - 1)


def apply_weight_sharding(transformer: nn.Module, *, block_lists: tuple[str, ...],
                          mesh_or_group: DeviceMesh | ProcessGroup, prefetch: bool = True,
                          stats: CommStats | None = None) -> ShardedWeights:
    """Shard the blocks in `transformer`'s `block_lists` (attribute names of ModuleLists, in
    execution order) over `mesh_or_group`: a 1-D DeviceMesh, or a process group to build one from.
    `prefetch`: each block's pre-forward starts the next block's all-gather. `stats` counts the
    all-gathers (kind "weight_all_gather"): FSDP2 runs them itself, outside parallel/comm.py.

    Apply it before hooks that move activations (sequence parallelism) so that FSDP's forward
    hook, which frees the gathered weights, runs before theirs; its pre-forward hook is prepended,
    so the weights are gathered first whatever the order. Caches that replace a block's `forward`
    compose at any time: the hooks run around whatever `forward` is.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if getattr(transformer, _MARK, False) or isinstance(transformer, FSDPModule):
        raise RuntimeError("weight sharding is already applied to this transformer (FSDP2 cannot be undone)")
    blocks = [block for attr in block_lists for block in getattr(transformer, attr)]
    if not blocks:
        raise ValueError(f"no blocks in {block_lists}")
    device = _device_of(transformer)
    if isinstance(mesh_or_group, DeviceMesh):
        mesh = mesh_or_group
        if mesh.ndim != 1:
            raise ValueError(f"weight sharding takes a 1-D mesh, got {mesh.ndim} dimensions")
        if mesh.device_type != device.type:
            raise ValueError(f"the mesh is on {mesh.device_type} but the transformer on {device}")
    else:
        mesh = shard_mesh(mesh_or_group, device_type=device.type)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    others = {p for p in transformer.parameters() if id(p) not in in_blocks}
    full = param_bytes(p for block in blocks for p in block.parameters())
    for block in blocks:
        if stats is not None:
            # One all-gather per call of the block, whatever its forward then does (a cache that
            # skips the block still has it gathered: the hooks run around the replaced forward).
            nbytes = gathered_bytes(block, mesh.size())
            block.register_forward_pre_hook(lambda module, args, nbytes=nbytes: stats.add("weight_all_gather", nbytes))
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root owns no parameters (the rest are ignored, so they stay replicated); it exists so
    # that all blocks share one communication state (see the module docstring).
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True, ignored_params=others)
    if prefetch:
        for block, following in zip(blocks, blocks[1:]):
            block.set_modules_to_forward_prefetch([following])
    setattr(transformer, _MARK, True)
    return ShardedWeights(blocks=blocks, size=mesh.size(), full_block_bytes=full, replicated_bytes=param_bytes(others))
