"""TaylorSeer (Liu et al., ICCV'25): compute every few steps, and in between predict features by a
Taylor expansion in the step from their values at the computed steps.

At each computed step a cached module's output Y updates its factors by divided differences,
    F0 = Y,   F(k+1) = (Fk − Fk_before) / (steps since the last computed step),   k < max_order,
and a step d steps after the last computed one predicts Σk Fk · d^k / k! without running the
module. The schedule is diffusers' `TaylorSeerCacheConfig` hook's, in the steps this transformer
runs (`Cache.own_step`; Wan 2.2's low-noise expert counts from its first step):

    compute  iff  step < warmup_steps  or  (step − warmup_steps − 1) % interval == 0
                  or  step >= compute_from_step,

so step `warmup_steps` itself predicts (diffusers' convention) and a branch with no factors yet
computes (where diffusers raises). The arithmetic is diffusers' too (differences in the output's
dtype, factors kept in `factors_dtype`, the prediction summed in the output's dtype from zero), so
one rank's decisions and latents equal its hook's given the same modules.

Two forms:
- full (TaylorSeer's own): every module whose name matches `modules` (re.fullmatch) is predicted;
  the rest of each block (norms, modulation, residual adds) still runs. The default modules are
  the ones TaylorSeer's code caches: Wan's self-attention, cross-attention and MLP per block;
  HunyuanVideo's dual-stream attention and both MLPs, and each single-stream block whole. Memory:
  (max_order + 1) factors of every predicted output per branch (Wan 1.3B 480p in bfloat16, order 1:
  about 18 GB per branch, split by the sequence-parallel degree).
- lite (`lite: true`, TaylorSeer-Lite, diffusers' `use_lite_mode`): only the final projection
  (`proj_out`) is predicted and the blocks are passed over (diffusers returns zeros from them; the
  projection ignores its input either way), so a predicted step runs no block at all. Memory: the
  output's factors only.

Decisions: schedule-only (the step and constants): every rank decides alike with no message, and
each rank keeps the factors of its own shard. Not under PipeFusion (a module runs once per patch
there, not once per step): a clear error. `factors` below (`update`, `predict`) also serve
DBCache's TaylorSeer calibrator (caching/dbcache.py), which predicts its reused residual.

Published settings (../shared/cache-facts.md): TaylorSeer's Wan 2.1 and HunyuanVideo code, N = 5
(`interval`), order 1; diffusers' defaults interval 5, warm-up 3, order 1, bfloat16 factors.
HunyuanVideo 1.5's release gives a schedule instead (generate.py: compute steps 0-10, every 4th
from 11 to 43, 45-49 of 50; its Taylor cache order 2): `compute_steps` writes such a schedule out
(configs/hunyuanvideo1.5/taylorseer.yaml).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Cache, CacheConfig, Kind, Site
from unison.caching.planning import ModelShape, Saves

FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LITE_MODULE = "proj_out"


@dataclass(frozen=True, kw_only=True)
class TaylorSeerConfig(CacheConfig):
    kind: str = field(default="taylorseer", init=False)
    """taylorseer."""
    interval: int = 5
    """A full step every this many steps after the warm-up (TaylorSeer's N; diffusers'
    cache_interval)."""
    warmup_steps: int = 3
    """The first steps compute (diffusers' disable_cache_before_step; the step after them predicts)."""
    compute_from_step: int | None = None
    """Steps from this one on compute (diffusers' disable_cache_after_step; None: none)."""
    max_order: int = 1
    """The Taylor expansion's highest order (0: reuse the last output, as FORA)."""
    factors_dtype: str = "bfloat16"
    """The factors' dtype: float32, bfloat16 or float16 (diffusers' taylor_factors_dtype)."""
    lite: bool = False
    """Predict the final projection only and pass over the blocks (TaylorSeer-Lite)."""
    modules: tuple[str, ...] | None = None
    """Full form: regular expressions (re.fullmatch on the module's name in the transformer) of the
    modules to predict (None: the model family's, its CacheHints.predicted_modules)."""
    compute_steps: tuple[int, ...] | None = None
    """Instead of warmup_steps, interval and compute_from_step: exactly these steps compute, the
    others predict (a schedule written out, as HunyuanVideo 1.5's release gives its no-cache steps;
    configs/hunyuanvideo1.5/taylorseer.yaml). None: the rule above."""

    def __post_init__(self):
        if self.modules is not None:  # a list from YAML or Python: frozen, comparable
            object.__setattr__(self, "modules", tuple(str(m) for m in self.modules))
        if self.compute_steps is not None:
            object.__setattr__(self, "compute_steps", tuple(self.compute_steps))
        super().__post_init__()
        self.at_least(interval=1, warmup_steps=0, max_order=0)
        self.at_least(compute_from_step=0, nullable=True)
        if self.factors_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factors_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factors_dtype!r}")
        if self.lite and self.modules is not None:
            raise ValueError("lite predicts proj_out alone: leave modules null, or set lite false")
        if self.modules is not None:
            if not self.modules:
                raise ValueError("modules must name at least one module pattern (or be null)")
            for pattern in self.modules:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"modules: {pattern!r} is not a regular expression ({err})") from None
        if self.compute_steps is not None:
            steps = self.compute_steps
            if not steps or any(type(s) is not int or s < 0 for s in steps):
                raise ValueError(f"compute_steps must be a non-empty list of step numbers (0 or more), got {list(steps)}")
            if list(steps) != sorted(set(steps)):
                raise ValueError(f"compute_steps must rise, each step once, got {list(steps)}")

    def check_run(self, *, steps: int) -> None:
        if self.compute_steps is not None and self.compute_steps[-1] >= steps:
            raise ValueError(f"compute_steps names step {self.compute_steps[-1]}, past the last of {steps} "
                             f"steps (0 to {steps - 1}): write the schedule for this run's steps")

    def computes(self, step: int) -> bool:
        """Whether step `step` (of this transformer) computes, before the no-factors rule."""
        if self.compute_steps is not None:
            return step in self.compute_steps
        return (step < self.warmup_steps or (step - self.warmup_steps - 1) % self.interval == 0
                or (self.compute_from_step is not None and step >= self.compute_from_step))


# -- the Taylor factors (also DBCache's calibrator) -------------------------------------------------
def update(factors: list[list[torch.Tensor]] | None, outputs: tuple[torch.Tensor, ...], elapsed: int | None,
           max_order: int, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """New factors, per output then per order, from `outputs` computed `elapsed` steps after the
    ones `factors` hold (None: the first). An order stops where the previous factors lack it or
    changed shape."""
    new = []
    for i, output in enumerate(outputs):
        orders = [output]
        before = factors[i] if factors is not None and elapsed else []
        for k in range(max_order):
            if k >= len(before) or before[k].shape != orders[k].shape:
                break
            orders.append((orders[k] - before[k].to(output.dtype)) / elapsed)
        new.append([f.to(dtype) for f in orders])
    return new


def predict(factors: list[list[torch.Tensor]], elapsed: int, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Σk Fk · elapsed^k / k! per output, summed in that output's dtype."""
    outputs = []
    for orders, dtype in zip(factors, dtypes):
        output = torch.zeros_like(orders[0], dtype=dtype)
        for k, factor in enumerate(orders):
            output = output + factor.to(dtype) * (elapsed ** k / math.factorial(k))
        outputs.append(output)
    return outputs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class _State:
    factors: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)
    """Per predicted module (its index): per output, the factors of orders 0, 1, ..."""
    dtypes: dict[int, list[str]] = field(default_factory=dict)
    """Per module: each output's dtype, as computed."""
    tuples: dict[int, bool] = field(default_factory=dict)
    """Per module: whether it returns a tuple."""
    updated: int | None = None
    """This transformer's step of the last computed forward."""
    computing: bool = True


class TaylorSeer(Cache):
    name = "taylorseer"
    decides = "schedule-only"
    state_type = _State

    def __init__(self, transformer, config: TaylorSeerConfig, *, blocks: list[torch.nn.Module],
                 agreement: Agreement, default_modules: tuple[str, ...] = ()):
        super().__init__(transformer)
        self.config, self.agreement = config, agreement
        self.dtype = FACTOR_DTYPES[config.factors_dtype]
        self._decided: tuple[int, str] | None = None
        """(step, context) of the forward the current decision is for."""
        self._tuple_blocks = False
        """Lite: the blocks return (hidden, text) (HunyuanVideo) rather than hidden alone."""
        named = dict(transformer.named_modules())
        if config.lite:
            if not blocks or LITE_MODULE not in named:
                self.remove()
                raise ValueError(f"lite needs the transformer's blocks and its {LITE_MODULE}")
            for block in blocks:
                self.wrap(block, self._block)
            predicted = [named[LITE_MODULE]]
            self.saves = "block"
        else:
            patterns = config.modules or default_modules
            if not patterns:
                self.remove()
                raise ValueError(f"no default modules for {type(transformer).__name__}: give cache.modules "
                                 f"(regular expressions of the module names to predict)")
            predicted = [module for name, module in named.items()
                         if name and any(re.fullmatch(p, name) for p in patterns)]
            if not predicted:
                self.remove()
                raise ValueError(f"modules {list(patterns)} match no module of {type(transformer).__name__}")
            self.saves = "predicted modules'"
        self.predicted = len(predicted)
        for index, module in enumerate(predicted):
            self.wrap(module, self._make_forward(index))

    def _computing(self) -> bool:
        """This forward's decision, taken at the first wrapped call of each (step, branch)."""
        state = self.state(_State)
        if self._decided != (self.step, self.context):
            self._decided = (self.step, self.context)
            compute = state.updated is None or self.config.computes(self.own_step)
            self.agreement.check(compute, step=self.step, cache=self.name, context=self.context)
            self.record("forward", compute)
            state.computing = compute
        return state.computing

    def _block(self, original, *args, **kwargs):
        if self._computing():
            output = original(*args, **kwargs)
            self._tuple_blocks = isinstance(output, tuple)
            return output
        return tuple(args[:2]) if self._tuple_blocks else args[0]

    def _make_forward(self, index: int):
        def forward(original, *args, **kwargs):
            state = self.state(_State)
            if self._computing():
                output = original(*args, **kwargs)
                outputs = output if isinstance(output, tuple) else (output,)
                elapsed = None if state.updated is None else self.own_step - state.updated
                state.factors[index] = update(state.factors.get(index), outputs, elapsed, self.config.max_order,
                                              self.dtype)
                state.dtypes[index] = [_dtype_name(o.dtype) for o in outputs]
                state.tuples[index] = isinstance(output, tuple)
                if index == self.predicted - 1:  # the forward's last predicted module: the step is in
                    state.updated = self.own_step
                return output
            dtypes = [getattr(torch, name) for name in state.dtypes[index]]
            outputs = predict(state.factors[index], self.own_step - state.updated, dtypes)
            return tuple(outputs) if state.tuples[index] else outputs[0]

        return forward

    def reset(self) -> None:
        super().reset()
        self._decided = None

    def extra_state(self) -> dict:
        return {"tuple_blocks": self._tuple_blocks}

    def load_extra_state(self, data: dict) -> None:
        self._tuple_blocks = data["tuple_blocks"]
        self._decided = None


def apply_taylorseer(transformer, config: TaylorSeerConfig, *, blocks: list[torch.nn.Module], group=None,
                     stats=None, default_modules: tuple[str, ...] = ()) -> TaylorSeer:
    """Apply TaylorSeer to `transformer` (`blocks`: its blocks in execution order, which the lite
    form passes over; `default_modules`: what the full form predicts when config.modules is not
    given, the model family's). `group` is only used by verify mode (decisions need no agreement)."""
    return TaylorSeer(transformer, config, blocks=blocks, default_modules=default_modules,
                      agreement=Agreement(group=group, stats=stats, verify=config.verify))


def _attach(transformer, config: TaylorSeerConfig, site: Site) -> TaylorSeer:
    return apply_taylorseer(transformer, config, blocks=site.blocks, group=site.group, stats=site.stats,
                            default_modules=site.hints.predicted_modules)


def state_per_token(shape: ModelShape, config: TaylorSeerConfig) -> float:
    """Its factors, in hidden-size tensors per token and branch: (max_order + 1) of every predicted
    output. Full form at its default modules: Wan's self-attention, cross-attention and MLP outputs
    per block; HunyuanVideo's dual-stream attention and MLP (image tokens) and each single-stream
    block's output. Lite: the final projection's output (channels x patch volume wide)."""
    orders = config.max_order + 1
    if config.lite:
        return orders * shape.out_per_token / shape.hidden
    if shape.joint_text:
        return orders * (2 * shape.dual_blocks + shape.single_blocks)
    return orders * 3 * shape.blocks


def schedule_skip_share(config: TaylorSeerConfig, steps: int) -> float:
    """The share of `steps` it predicts: its schedule, exactly (the first step computes)."""
    return sum(not (step == 0 or config.computes(step)) for step in range(steps)) / steps


KIND = Kind(name="taylorseer", title="TaylorSeer", config=TaylorSeerConfig, attach=_attach,
            decides=TaylorSeer.decides, saves=Saves.BLOCK_STACK, state_per_token=state_per_token,
            default_skip_share=None, schedule_skip_share=schedule_skip_share)
"""A predicted step runs (nearly) no block: the full form still runs each block's norms and
modulation, the lite form none."""
