"""What MagCache and TeaCache share: reusing the whole block stack.

The first block's wrapper asks the kind whether this forward computes (`_decide_forward`, given
the branch's state and the first block's inputs); the answer is cross-checked in verify mode and
logged. A computed forward runs every block and keeps the stack's residual (last block's output
minus first block's input, hidden states only) in the branch's state; a skipped one returns the
first block's input plus that residual and passes the other blocks through untouched. A kind's
per-branch state subclasses `StackState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Cache


@dataclass
class StackState:
    """What the stack reuse keeps per branch (a kind adds its decision's own fields)."""

    residual: object = None
    """The block stack's residual (hidden states only) at the last computed forward."""
    head_input: object = None
    """The first block's input, from the head to the tail of a computed forward."""
    computing: bool = True


class StackCache(Cache):
    """Base of the kinds that skip the whole block stack at once."""

    def __init__(self, transformer, *, blocks: list[torch.nn.Module], agreement: Agreement):
        if not blocks:
            raise ValueError(f"{self.name} needs the transformer's blocks")
        super().__init__(transformer)
        self.agreement = agreement
        self._tuple_output = False
        """Blocks return (hidden, text) (HunyuanVideo) rather than hidden alone."""
        self.wrap(blocks[0], self._head)
        for block in blocks[1:-1]:
            self.wrap(block, self._middle)
        if len(blocks) > 1:
            self.wrap(blocks[-1], self._tail)

    def _decide_forward(self, state, args, kwargs) -> bool:
        """Compute (True) or reuse the residual, the same on every rank of the agreement group."""
        raise NotImplementedError

    def _keep(self, state, residual: torch.Tensor) -> None:
        """A computed forward's stack residual becomes the branch's (a kind may look at it first)."""
        state.residual = residual

    def extra_state(self) -> dict:
        return {"tuple_output": self._tuple_output}

    def load_extra_state(self, data: dict) -> None:
        self._tuple_output = data["tuple_output"]  # a resumed video may skip before it computes

    def _head(self, original, *args, **kwargs):
        state = self.state(self.state_type)
        compute = self._decide_forward(state, args, kwargs)
        self.agreement.check(compute, step=self.step, cache=self.name, context=self.context)
        self.record("forward", compute)
        state.computing = compute
        if compute:
            state.head_input = args[0]
            output = original(*args, **kwargs)
            self._tuple_output = isinstance(output, tuple)
            if len(self._wrapped) == 1:  # one block: head and tail at once
                self._keep(state, (output[0] if self._tuple_output else output) - args[0])
            return output
        hidden = args[0] + state.residual
        return (hidden, args[1]) if self._tuple_output else hidden

    def _passthrough(self, args):
        """A skipped block's output: its inputs (hidden, and text for HunyuanVideo's blocks)."""
        return tuple(args[:2]) if self._tuple_output else args[0]

    def _middle(self, original, *args, **kwargs):
        if self.state(self.state_type).computing:
            return original(*args, **kwargs)
        return self._passthrough(args)

    def _tail(self, original, *args, **kwargs):
        state = self.state(self.state_type)
        if not state.computing:
            return self._passthrough(args)
        output = original(*args, **kwargs)
        self._keep(state, (output[0] if self._tuple_output else output) - state.head_input)
        state.head_input = None
        return output
