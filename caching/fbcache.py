"""First-Block Cache: run the first block; if its output residual barely changed since the last
computed step, reuse the remaining blocks' residual instead of running them.

The criterion is diffusers' `FirstBlockCacheConfig` (after ParaAttention): the relative mean
absolute change of the first block's residual against the one from the last computed step,
    Σ|r - r_prev| / Σ|r_prev|  <=  threshold  ->  skip,
so a threshold tuned for diffusers' hook makes the same decisions here on one rank. Under
sequence parallelism both sums run over this rank's real (unpadded) tokens and are added over
the sequence-parallel group by `Agreement.ratio` before anyone branches, so every rank decides
as one rank would over the whole sequence.

Guidance branches decide separately by default (cache contexts "cond" and "uncond"), as one rank
does. With `joint_cfg` the conditional branch leads: its change decides the step for both, so both
branches skip the same steps. Under CFG parallelism that is what turns skips into time saved: the
two halves exchange their predictions every step, so a step is only as fast as its slower half,
and per-branch decisions that differ leave one half waiting. On one rank the unconditional pass
reads the decision cond took a moment earlier; under CFG parallelism the agreement group spans
both halves, the uncond ranks add zeros to the sums, and every rank reads cond's ratio.

Under PipeFusion the first block lives on stage 0 only: the StageRunner runs it on the whole
sequence there (fresh K/V, so exact), every stage joins the agreement (the others add zeros),
and on a skipped step stage 0 adds the cached residual and broadcasts the result (see
parallel/pipefusion.py). The decision is the one-rank decision whenever the block's input is.

Decisions: data-dependent (the first block's residual), agreed by sums over the sharing ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Cache, CacheConfig, Kind, Site
from unison.caching.planning import ModelShape, Saves


class GateHost(Protocol):
    """What stands in for the blocks under PipeFusion (parallel/pipefusion.py's StageRunner): it
    counts the blocks of every stage and asks its `gate` (this cache) at the first block. Named
    by shape, so caching/ imports nothing of parallel/ but the collectives."""

    total_blocks: int
    gate: object

LEADER = "cond"
"""The cache context whose change decides for both branches under joint_cfg."""


@dataclass(frozen=True, kw_only=True)
class FirstBlockCacheConfig(CacheConfig):
    kind: str = field(default="fbcache", init=False)
    """fbcache."""
    threshold: float = 0.05
    """Skip the remaining blocks when the first block's residual changed by at most this much
    (relative mean absolute change). 0 never skips."""
    warmup_steps: int = 0
    """The first steps this transformer runs always compute (Wan 2.2: each expert's own first
    steps, as cache-dit counts them)."""
    max_consecutive_skips: int | None = None
    """After this many skips in a row, compute (None: no limit)."""
    joint_cfg: bool = False
    """One decision per step for both guidance branches, taken from the conditional branch's
    change, so both skip the same steps (under CFG parallel neither half waits for the other).
    Default: each branch decides from its own change, as diffusers does."""

    def __post_init__(self):
        super().__post_init__()
        self.at_least(threshold=0, warmup_steps=0)
        self.at_least(max_consecutive_skips=1, nullable=True)


@dataclass
class _State:
    prev_residual: torch.Tensor | None = None
    """The first block's residual at the last computed step."""
    head_output: object = None
    """The deciding block's output, from the gate to the tail of the same forward (then None)."""
    tail_residual: tuple | None = None
    """(hidden, text or None): last block's output minus the first block's, at that step."""
    tail_factors: list | None = None
    """DBCache's TaylorSeer calibrator: the residual's Taylor factors instead (per part, per order)."""
    tail_step: int | None = None
    """The calibrator: this transformer's step of the last computed forward."""
    computing: bool = True
    skips_in_row: int = 0
    skips: int = 0
    """Skips this video (DBCache's max_cached_steps)."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class FirstBlockCache(Cache):
    name = "fbcache"
    decides = "data-dependent"
    state_type = _State

    def __init__(self, transformer, config: FirstBlockCacheConfig, *, blocks: list[torch.nn.Module] | None = None,
                 pipeline: "GateHost | None" = None, agreement: Agreement, valid_tokens: Callable[[], int | None],
                 front: int = 1, back: int = 0):
        """`front` blocks always run and the last of them decides (First-Block Cache: 1); `back`
        blocks always run after the cached middle (0). DBCache (caching/dbcache.py) sets both."""
        total = pipeline.total_blocks if pipeline is not None else len(blocks)
        if front < 1 or back < 0 or front + back >= total:
            raise ValueError(f"{front} front and {back} back blocks leave no block to cache of the transformer's "
                             f"{total}: front + back must be below {total}")
        if pipeline is not None and (front, back) != (1, 0):
            raise ValueError("under PipeFusion only the first block can decide (front 1, back 0)")
        if pipeline is not None and pipeline.gate is not None:
            raise RuntimeError("this PipeFusion stage already has a First-Block Cache")
        super().__init__(transformer)
        self.config, self.agreement, self.valid_tokens = config, agreement, valid_tokens
        self.blocks, self.front, self.back = total, front, back
        self.pipeline = pipeline
        self._input: torch.Tensor | None = None
        """The first block's input hidden states in this forward (front > 1: the residual's base)."""
        self.changes: list[tuple[int, str, float]] = []
        """(step, context, relative change) for every decision that measured one: to tune the threshold."""
        self._led: dict[int, bool] = {}
        """joint_cfg: the conditional branch's decision per step, when it ran on this rank."""
        self._tuple_output = False
        if pipeline is not None:  # the StageRunner calls decide / skipped / computed
            pipeline.gate = self
            return
        head, tail = front - 1, total - back - 1
        if front > 1:
            self.wrap(blocks[0], self._enter)
        self.wrap(blocks[head], self._head)
        for block in blocks[head + 1:tail]:
            self.wrap(block, self._middle)
        self.wrap(blocks[tail], self._tail)

    def remove(self) -> None:
        super().remove()
        if self.pipeline is not None:
            self.pipeline.gate = None

    def _forced(self, state: _State) -> bool | None:
        """A decision the rules take before any data is measured (the same on every rank: they
        depend only on the step and the decision history); None: the change decides."""
        limit = self.config.max_consecutive_skips
        if (state.prev_residual is None or self.own_step < self.config.warmup_steps
                or (limit is not None and state.skips_in_row >= limit)):
            return True
        return None

    def _change(self, residual: torch.Tensor, prev: torch.Tensor) -> float:
        rows = self.valid_tokens()
        if rows is not None:
            residual, prev = residual[:, :rows], prev[:, :rows]
        return self.agreement.ratio((residual - prev).abs().sum(dtype=torch.float64),
                                    prev.abs().sum(dtype=torch.float64))

    def _decide(self, residual: torch.Tensor, state: _State) -> bool:
        """Compute (True) or skip. Every rank of the agreement group reaches the same answer
        through the same collectives: the rules before `ratio` depend only on the step history."""
        follower = self.config.joint_cfg and self.context != LEADER
        if follower and self.step in self._led:
            return self._led[self.step]
        forced = self._forced(state)
        if forced is not None:
            return forced
        if follower:  # CFG parallel: the leading half's sums arrive; this half adds nothing
            zero = torch.zeros((), dtype=torch.float64, device=residual.device)
            return self.agreement.ratio(zero, zero) > self.config.threshold
        change = self._change(residual, state.prev_residual)
        self.changes.append((self.step, self.context, change))
        return change > self.config.threshold

    def _gate(self, residual: torch.Tensor) -> bool:
        """Decide this forward from the first block's residual, record it, and keep the state
        every later decision needs; the same on every rank of the agreement group."""
        state = self.state(_State)
        compute = self._decide(residual, state)
        if self.config.joint_cfg and self.context == LEADER:
            self._led[self.step] = compute
        self.agreement.check(compute, step=self.step, cache=self.name, context=self.context)
        self.record("forward", compute)
        state.computing = compute
        if compute:
            state.prev_residual, state.skips_in_row = residual, 0
        else:
            state.skips_in_row += 1
            state.skips += 1
        return compute

    def _enter(self, original, *args, **kwargs):
        self._input = args[0]
        return original(*args, **kwargs)

    def _head(self, original, *args, **kwargs):
        output = original(*args, **kwargs)
        self._tuple_output = isinstance(output, tuple)
        base, self._input = (self._input if self.front > 1 else args[0]), None
        if self._gate(_hidden(output) - base):
            self.state(_State).head_output = output
            return output
        tail = self._reused_tail(self.state(_State))
        if self._tuple_output:
            return tuple(o + r if r is not None else o for o, r in zip(output, tail))
        return output + tail[0]

    # -- a PipeFusion StageRunner's gate (parallel/pipefusion.py's FirstBlockGate) ---------------
    def decide(self, residual: torch.Tensor, head: torch.Tensor | None) -> bool:
        """Stage 0 passes the first block's whole-sequence residual and output; the other stages
        an empty residual, so their sums are zero and every rank reads stage 0's change."""
        compute = self._gate(residual)
        if compute:
            self.state(_State).head_output = head
        return compute

    def skipped(self, head: torch.Tensor) -> torch.Tensor:
        return head + self._reused_tail(self.state(_State))[0]

    def computed(self, output: torch.Tensor) -> None:
        state = self.state(_State)
        self._keep_tail(state, (output - state.head_output, None))
        state.head_output = None

    def _keep_tail(self, state: _State, tail: tuple) -> None:
        """A computed forward's middle residual (hidden, text or None) becomes the one to reuse."""
        state.tail_residual = tail

    def _reused_tail(self, state: _State) -> tuple:
        """The residual a skipped forward adds: the last computed one (DBCache's calibrator predicts it)."""
        return state.tail_residual

    def reset(self) -> None:
        super().reset()
        self.changes, self._led = [], {}

    def extra_state(self) -> dict:
        return {"changes": list(self.changes), "led": dict(self._led)}

    def load_extra_state(self, data: dict) -> None:
        self.changes, self._led = list(data["changes"]), dict(data["led"])

    def _passthrough(self, args):
        """A skipped block's output: its inputs (hidden, and text for HunyuanVideo's blocks)."""
        return tuple(args[:2]) if self._tuple_output else args[0]

    def _middle(self, original, *args, **kwargs):
        if self.state(_State).computing:
            return original(*args, **kwargs)
        return self._passthrough(args)

    def _tail(self, original, *args, **kwargs):
        state = self.state(_State)
        if not state.computing:
            return self._passthrough(args)
        output = original(*args, **kwargs)
        if self._tuple_output:
            self._keep_tail(state, (output[0] - state.head_output[0], output[1] - state.head_output[1]))
        else:
            self._keep_tail(state, (output - state.head_output, None))
        state.head_output = None  # read only in this forward: not kept between steps, nor checkpointed
        return output

    def saved_fraction(self) -> float:
        """Share of block calls not run (skipped forwards run the front and back blocks)."""
        return self.skipped_share() * (self.blocks - self.front - self.back) / self.blocks


def apply_first_block_cache(transformer, config: FirstBlockCacheConfig, *, group=None,
                            blocks: list[torch.nn.Module] | None = None, pipeline: "GateHost | None" = None,
                            valid_tokens: Callable[[], int | None] = lambda: None, stats=None) -> FirstBlockCache:
    """Apply First-Block Cache to `transformer`'s `blocks` (in execution order), or to the
    PipeFusion `pipeline` that stands in for them (as its gate). `group`: the ranks that share
    the blocks' collectives (the sequence- or patch-parallel group; with joint_cfg under CFG
    parallelism, both halves' ranks), over which the decision is agreed; `valid_tokens()`: real
    tokens at the start of this rank's shard."""
    if (blocks is None) == (pipeline is None):
        raise ValueError("pass exactly one of blocks and pipeline")
    return FirstBlockCache(transformer, config, blocks=blocks, pipeline=pipeline, valid_tokens=valid_tokens,
                           agreement=Agreement(group=group, stats=stats, verify=config.verify))


def _attach(transformer, config: FirstBlockCacheConfig, site: Site) -> FirstBlockCache:
    """With joint_cfg under CFG parallelism the decision is agreed over both halves."""
    group = site.cfg_group if config.joint_cfg and site.cfg_group is not None else site.group
    if site.pipeline is not None:
        return apply_first_block_cache(transformer, config, group=group, pipeline=site.pipeline, stats=site.stats)
    return apply_first_block_cache(transformer, config, group=group, blocks=site.blocks, stats=site.stats,
                                   valid_tokens=site.valid_tokens)


def state_per_token(shape: ModelShape, config: FirstBlockCacheConfig) -> float:
    """Two hidden-size tensors per token and branch: the deciding block's residual at the last
    computed step and the remaining blocks' residual it reuses (HunyuanVideo's text part of the
    latter is left out, as the planner counts video tokens)."""
    return 2


# Skip share assumed: 0.4, about what the bundled thresholds skip over 50 steps (a guess, no
# measurement at real size yet); ParaAttention's HunyuanVideo run at threshold 0.06 is 1.62x
# faster on one L20 (../shared/cache-facts.md section 3.3), about 38% of the time saved.
KIND = Kind(name="fbcache", title="First-Block Cache", config=FirstBlockCacheConfig, attach=_attach,
            decides=FirstBlockCache.decides, pipefusion=True, saves=Saves.BLOCKS_AFTER_FIRST,
            state_per_token=state_per_token, default_skip_share=0.4)
