"""What every cache shares: wrapping module forwards (and undoing it), state per cache context,
the current step, and counts for the run summary.

A cache is applied to one transformer (Wan 2.2's experts each get their own). The loop tells it
the step (`begin_step`) and the branch (`set_context("cond")` / `"uncond"`) before each forward;
state never leaks between contexts, and `reset()` (every new video) forgets all of it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

_MARK = "_unison_cache"


class Cache:
    """Base of First-Block Cache and Pyramid Attention Broadcast."""

    name = "cache"
    state_type: type | None = None
    """The dataclass of one context's state (what `state(factory)` makes), for checkpoints."""

    def __init__(self, transformer: torch.nn.Module):
        if getattr(transformer, _MARK, None) is not None:
            raise RuntimeError(f"a cache ({getattr(transformer, _MARK).name}) is already applied to this "
                               "transformer; remove it first")
        self.transformer = transformer
        self.context = "cond"
        self.step = 0
        self.timestep = 0.0
        self.states: dict[str, Any] = {}
        self.decisions: list[tuple] = []
        """(step, context, what, computed) for every decision, in order: the skip schedule."""
        self._wrapped: list[tuple[torch.nn.Module, Callable[..., Any] | None]] = []
        """(module, the instance `forward` it had before, or None)."""
        setattr(transformer, _MARK, self)

    # -- what the loop calls ------------------------------------------------------------------
    def begin_step(self, index: int, timestep: float) -> None:
        self.step, self.timestep = index, float(timestep)

    def set_context(self, name: str) -> None:
        self.context = name

    def reset(self) -> None:
        """Forget every context's state and counts (a new video)."""
        self.states.clear()
        self.decisions = []

    def remove(self) -> None:
        """Restore the original forwards; the transformer is as it was before apply."""
        for module, below in self._wrapped:
            if below is None:
                del module.forward
            else:
                module.forward = below
        self._wrapped.clear()
        setattr(self.transformer, _MARK, None)

    # -- step checkpoints (engine/checkpoint.py) ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything later decisions and outputs depend on: each context's state (tensors as they
        are; the checkpoint moves them) and the decision log. Taken at a step boundary."""
        states = {context: {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
                  for context, state in self.states.items()}
        return {"states": states, "decisions": list(self.decisions), **self.extra_state()}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s result, as if the steps before it had just run here."""
        self.reset()
        self.states = {context: self.state_type(**fields) for context, fields in data["states"].items()}
        self.decisions = list(data["decisions"])
        self.load_extra_state(data)

    def extra_state(self) -> dict[str, Any]:
        """A subclass's state beyond the contexts' (kept under its own keys)."""
        return {}

    def load_extra_state(self, data: dict[str, Any]) -> None:
        pass

    # -- for subclasses -----------------------------------------------------------------------
    def state(self, factory: Callable[[], Any]) -> Any:
        if self.context not in self.states:
            self.states[self.context] = factory()
        return self.states[self.context]

    def wrap(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        """Make module(...) call forward(original_forward, *args, **kwargs); hooks still run around it.

        The original is the module's class `forward`, looked up at each call, so that blocks
        compiled after the cache was applied (engine/compile.py swaps their class) run compiled
        under it; or a `forward` already set on the instance, which remove() puts back. The
        wrapper is never traced by TorchDynamo: a cache's decisions (Python state, a host read of
        the agreed sums) stay out of compiled graphs, and a wrapper met inside a compiled block
        (Pyramid Attention Broadcast's, on an attention) is a graph break."""
        below = module.__dict__.get("forward")

        def call(*args, **kwargs):
            original = below if below is not None else functools.partial(type(module).forward, module)
            return forward(original, *args, **kwargs)

        module.forward = torch.compiler.disable(call)
        self._wrapped.append((module, below))

    def record(self, what: str, computed: bool) -> None:
        self.decisions.append((self.step, self.context, what, computed))

    def summary(self) -> dict[str, dict[str, int]]:
        """Per context: forwards (or attention calls) computed and skipped."""
        counts: dict[str, dict[str, int]] = {}
        for _, context, _, computed in self.decisions:
            entry = counts.setdefault(context, {"computed": 0, "skipped": 0})
            entry["computed" if computed else "skipped"] += 1
        return dict(sorted(counts.items()))

    def skipped_share(self) -> float:
        """Share of decisions that skipped."""
        return sum(not d[3] for d in self.decisions) / len(self.decisions) if self.decisions else 0.0
