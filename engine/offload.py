"""model.offload: keep what is idle on the CPU so the GPU holds only what is working.

Two things sit idle for most of a render of the big models: the text encoders (umT5-XXL is
about 11 GB in bf16, HunyuanVideo's LLaVA-Llama about 15 GB) once the prompts are encoded, and
Wan 2.2 A14B's other expert (14B parameters, 28 GB in bf16) while one expert runs. With offload
the text encoders live on the CPU and visit the GPU to encode, and only the expert in use is on
the GPU: the high-noise expert until the boundary step, then the low-noise one. Each move is a
host-device copy of the module's weights (a few seconds for 28 GB over PCIe 4), once per video
per module, never per step. Modules keep their identity (hooks, caches and compiled blocks stay
attached; `.to()` swaps parameter data in place).

Not combined with `parallel.shard_weights`: sharded experts already hold 1/N of their blocks per
rank, and moving FSDP-sharded parameters between devices is not supported by this engine; the
text encoders are still offloaded then.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class Offloader:
    """Moves a pipeline's idle modules between the compute device and the CPU."""

    park = torch.device("cpu")
    """Where idle modules wait."""

    def __init__(self, pipe, experts: tuple[str, ...], text_encoders: tuple[str, ...], device: torch.device, *,
                 enabled: bool, experts_too: bool = True):
        self.pipe, self.experts, self.text_encoders, self.device = pipe, experts, text_encoders, device
        self.enabled = enabled
        self.experts_too = experts_too and len(experts) > 1
        self.moves: list[tuple[str, str]] = []
        """(component, device) of every move made, in order (for the summary and tests)."""
        self.active: str | None = experts[0]

    def _move(self, name: str, device: torch.device) -> None:
        module = getattr(self.pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
            self.moves.append((name, str(device)))

    def idle(self) -> set[str]:
        """Components that start on the CPU: the text encoders and every expert but the first."""
        if not self.enabled:
            return set()
        return set(self.text_encoders) | (set(self.experts[1:]) if self.experts_too else set())

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """The text encoders on the compute device for the length of prompt encoding."""
        if not self.enabled:
            yield
            return
        for name in self.text_encoders:
            self._move(name, self.device)
        try:
            yield
        finally:
            for name in self.text_encoders:
                self._move(name, self.park)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def use_expert(self, name: str) -> None:
        """Make `name` the expert on the compute device (the other one goes to the CPU first, so
        both are never on the GPU at once)."""
        if not (self.enabled and self.experts_too) or name == self.active:
            return
        if self.active is not None:
            self._move(self.active, self.park)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._move(name, self.device)
        self.active = name


def offloader_for(plan, pipe) -> Offloader:
    """The run's offloader (a no-op unless model.offload); experts stay put under shard_weights."""
    return Offloader(pipe, plan.spec.experts, plan.spec.text_encoders, plan.device,
                     enabled=plan.config.model.offload, experts_too=not plan.config.parallel.shard_weights)
