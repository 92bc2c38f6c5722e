"""TeaCache (Liu et al., CVPR'25): skip the whole block stack while the accumulated, rescaled change
of a cheap timestep-conditioned indicator stays small, reusing the stack's last residual.

At each forward of a branch (cache context), with m the indicator and m' its value at the
branch's previous forward:

    rel     = Σ|m − m'| / Σ|m'|                  (the relative L1 change; means, as sums)
    acc    += poly(rel)                           poly: the model's fitted polynomial, highest power first
    skip  iff  acc < threshold    otherwise compute, and acc = 0

m' is updated at every forward, computed or skipped; a skipped forward returns its input plus the
residual (last block's output − first block's input) of the branch's last computed forward. The
first `warmup_steps` steps, the last step when `compute_last` is on, and a step after
`max_consecutive_skips` skips in a row compute (acc = 0, nothing measured). That is the rule of
TeaCache's own Wan 2.1 and HunyuanVideo code (strict `<`, accumulator reset on compute, the
indicator compared with the previous call's, not the last computed one's); the published
coefficients and boundary steps are the presets below.

The indicator is the model family's (its `CacheHints.indicator`, declared in
engine/models/<family>/): Wan's is the first block's timestep modulation input (TeaCache's Wan e0,
its "retention steps" mode, which the Wan presets' coefficients were fitted on); HunyuanVideo's
the first dual-stream block's modulated, normed image tokens, computed once more before the block
(as TeaCache does).

Decisions:
- schedule-only on Wan 2.1 and Wan 2.2 A14B: the modulation depends only on the timestep, so
  every rank holds the same tensor and computes the same change with no message (a test counts
  the collectives under Ulysses 2);
- data-dependent on HunyuanVideo and Wan 2.2 TI2V-5B (one timestep per token, so the modulation is
  split with the tokens): both sums, over this rank's real tokens, are added over the ranks that
  share the blocks by `Agreement.ratio` (one float64 all-reduce) before anyone branches, so N ranks
  decide as one rank does over the whole sequence. TeaCache's own multi-GPU HunyuanVideo code
  takes the mean of each rank's shard, which lets ranks disagree.
`Cache.decides` says which, once the first forward has shown the indicator. Under sequence
parallelism each rank keeps the residual of its own shard. Not under PipeFusion (the first block
lives on one stage; the gate protocol First-Block Cache uses would be needed).

| preset | coefficients (TeaCache @7c10efc4) | warm-up | last step | thresholds (README) |
|---|---|---|---|---|
| wan2.1-t2v-1.3b | teacache_generate.py L880-894, retention mode | 5 | may skip | 0.05, 0.10 |
| wan2.1-t2v-14b | same place | 5 | may skip | 0.10, 0.20 |
| wan2.1-i2v-14b-480p | L964-978, retention mode | 5 | may skip | 0.20, 0.30 |
| wan2.1-i2v-14b-720p | same place | 5 | may skip | 0.20, 0.30 |
| hunyuanvideo | teacache_sample_video.py L80-113 | 1 | computes | 0.10, 0.15 |

TeaCache's other Wan mode (the time embedding before its projection, with other coefficients) and
LightX2V's TI2V-5B fit (also on that embedding) read a tensor the blocks never see, so they are not
presets here; Wan 2.2 A14B has no published coefficients. Such models take `coefficients`, which
`unison calibrate --cache teacache` fits (launch/cache_calibration.py) from what calibrate mode
records: per branch and step, x (the indicator's change, as the decision measures it) and y (the
block stack output's relative L1 change), never skipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Calibration, CacheConfig, CacheHints, Kind, Site
from unison.caching.planning import ModelShape, Saves
from unison.caching.stack import StackCache, StackState


@dataclass(frozen=True)
class Published:
    coefficients: tuple[float, ...]
    """The rescaling polynomial, highest power first (numpy's poly1d order)."""
    warmup_steps: int
    """Steps that always compute first (TeaCache's ret_steps / 2: it counts cond and uncond calls)."""
    compute_last: bool
    """The last step always computes (TeaCache's cutoff_steps)."""
    source: str


PRESETS: dict[str, Published] = {
    "wan2.1-t2v-1.3b": Published(
        (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02), 5, False,
        "TeaCache4Wan2.1/teacache_generate.py L880-894, T2V 1.3B, use_ret_steps"),
    "wan2.1-t2v-14b": Published(
        (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01), 5, False,
        "TeaCache4Wan2.1/teacache_generate.py L880-894, T2V 14B, use_ret_steps"),
    "wan2.1-i2v-14b-480p": Published(
        (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01), 5, False,
        "TeaCache4Wan2.1/teacache_generate.py L964-978, I2V 480P, use_ret_steps"),
    "wan2.1-i2v-14b-720p": Published(
        (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02), 5, False,
        "TeaCache4Wan2.1/teacache_generate.py L964-978, I2V 720P, use_ret_steps"),
    "hunyuanvideo": Published(
        (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02), 1, True,
        "TeaCache4HunyuanVideo/teacache_sample_video.py L80-113"),
}
"""The official coefficients, in the mode whose indicator unison reads (see the module docstring)."""

DEGREES = (4, 5)
"""Polynomial degrees taken: TeaCache's fits are 4th degree; LightX2V's TI2V-5B fit is 5th."""


@dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(CacheConfig):
    kind: str = field(default="teacache", init=False)
    """teacache."""
    threshold: float = 0.1
    """Skip while the accumulated rescaled change of the indicator is below this (TeaCache's
    rel_l1_thresh; per model in the presets' table: higher is faster and further from the
    uncached video)."""
    preset: str | None = None
    """The published coefficients and boundary steps of a model: wan2.1-t2v-1.3b, wan2.1-t2v-14b,
    wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, hunyuanvideo. Left out (with coefficients) on a
    folder of one of those checkpoints, the plan detects it from the folder's transformer config
    and names it in the resolved config (engine/cache_presets.py)."""
    coefficients: tuple[float, ...] | None = None
    """Instead of a preset: the rescaling polynomial, highest power first, 5 values (4th degree)
    or 6 (5th)."""
    warmup_steps: int | None = None
    """The first steps always compute (null: the preset's, 5 for Wan and 1 for HunyuanVideo;
    1 without a preset)."""
    compute_last: bool | None = None
    """The last step always computes (null: the preset's, off for Wan and on for HunyuanVideo;
    on without a preset)."""
    max_consecutive_skips: int | None = None
    """After this many skips in a row, compute (None: no limit, as published)."""
    calibrate: bool = False
    """Measure what this model's polynomial is fitted on instead (`unison calibrate --cache
    teacache`): never skips, and records per branch and step x, the indicator's relative L1
    change (what the decision measures), and y, the block stack output's relative L1 change."""

    def __post_init__(self):
        if self.coefficients is not None:  # a list from Python code or YAML: frozen, comparable
            object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.preset is not None and self.coefficients is not None:
            raise ValueError("preset and coefficients both given: give one")
        if self.coefficients is not None and len(self.coefficients) - 1 not in DEGREES:
            raise ValueError(f"coefficients needs 5 values (a 4th-degree polynomial, highest power first) or 6 "
                             f"(5th degree), got {len(self.coefficients)}")
        self.at_least(threshold=0.0)  # a negative threshold would never skip, without a word
        self.at_least(warmup_steps=0, max_consecutive_skips=1, nullable=True)

    def check_complete(self) -> None:
        if self.preset is None and self.coefficients is None and not self.calibrate:
            raise ValueError(f"coefficients must be given: TeaCache needs this model's rescaling polynomial; set "
                             f"cache.preset (one of {', '.join(PRESETS)}) or cache.coefficients, or fit them with "
                             f"`unison calibrate --cache teacache`")

    def resolved(self) -> Published:
        """The coefficients and boundary steps this config means (a preset's, overridden by the fields
        set; calibrating without either, no coefficients: none is read)."""
        self.check_complete()
        base = PRESETS[self.preset] if self.preset is not None else Published(self.coefficients, 1, True, "given")
        return Published(base.coefficients,
                         base.warmup_steps if self.warmup_steps is None else self.warmup_steps,
                         base.compute_last if self.compute_last is None else self.compute_last, base.source)


def rescale(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial at x (Horner, float64)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


_LOCAL = Agreement()
"""This rank alone: the ratio of a whole (replicated) indicator, with no collective."""


@dataclass
class _State(StackState):
    previous: object = None
    """The indicator at this branch's previous forward (this rank's real tokens where split)."""
    accumulated: float = 0.0
    """Σ poly(rel) since the last computed forward."""
    skips_in_row: int = 0
    change: float | None = None
    """Calibrating: this forward's indicator change x (None at the branch's first forward)."""
    previous_output: object = None
    """Calibrating: the block stack's output (hidden states, this rank's real tokens) at the
    branch's previous forward."""


class TeaCache(StackCache):
    name = "teacache"
    decides = "schedule-only"
    """Until the first forward shows a per-token indicator (then data-dependent)."""
    state_type = _State

    def __init__(self, transformer, config: TeaCacheConfig, *, blocks: list[torch.nn.Module], agreement: Agreement,
                 hints: CacheHints, valid_tokens: Callable[[], int | None] = lambda: None):
        if not blocks:
            raise ValueError("TeaCache needs the transformer's blocks")
        if hints.indicator is None:
            raise ValueError(f"TeaCache has no indicator for {type(blocks[0]).__name__} blocks (the model family "
                             f"declares none)")
        indicator, tuple_output = hints.indicator, hints.blocks_return_text
        super().__init__(transformer, blocks=blocks, agreement=agreement)
        self.indicator, self._tuple_output = indicator, tuple_output
        self.head = blocks[0]
        self.config, self.valid_tokens = config, valid_tokens
        self.published = config.resolved()
        self.changes: list[tuple[int, str, float, float]] = []
        """(step, context, relative change, accumulated after it) per measured forward: to tune the threshold."""
        self.pairs: list[tuple[int, str, float, float]] = []
        """Calibrating: (step, context, x, y) from each branch's second forward on: x the
        indicator's relative L1 change, y the block stack output's (see `_measure_output`)."""

    def reset(self) -> None:
        super().reset()
        self.changes = []
        self.pairs = []

    def extra_state(self) -> dict:
        return {**super().extra_state(), "changes": list(self.changes), "pairs": list(self.pairs)}

    def load_extra_state(self, data: dict) -> None:
        super().load_extra_state(data)
        self.changes = list(data["changes"])
        self.pairs = list(data.get("pairs", []))

    def _forced(self, state: _State) -> bool:
        """Compute whatever the indicator says: a rule of the step history alone, so every rank
        of the agreement group reaches it alike (and skips the collective alike)."""
        limit, last = self.config.max_consecutive_skips, self.steps is not None and self.step == self.steps - 1
        return (state.previous is None or state.residual is None or self.step < self.published.warmup_steps
                or (self.published.compute_last and last) or (limit is not None and state.skips_in_row >= limit))

    def _change(self, current: torch.Tensor, previous: torch.Tensor, split: bool) -> float:
        numerator = (current - previous).abs().sum(dtype=torch.float64)
        denominator = previous.abs().sum(dtype=torch.float64)
        # A whole indicator is the same on every rank: this rank's ratio, no message.
        return (self.agreement if split else _LOCAL).ratio(numerator, denominator)

    def _decide(self, state: _State, current: torch.Tensor, split: bool) -> bool:
        previous, state.previous = state.previous, current
        if self._forced(state):
            state.accumulated = 0.0
            return True
        change = self._change(current, previous, split)
        state.accumulated += rescale(self.published.coefficients, change)
        self.changes.append((self.step, self.context, change, state.accumulated))
        if state.accumulated < self.config.threshold:
            return False
        state.accumulated = 0.0
        return True

    def _decide_forward(self, state: _State, args, kwargs) -> bool:
        current, split = self._read(args, kwargs)
        if self.config.calibrate:  # x, measured as the decision measures it; always compute
            previous, state.previous = state.previous, current
            state.change = None if previous is None else self._change(current, previous, split)
            return True
        compute = self._decide(state, current, split)
        state.skips_in_row = 0 if compute else state.skips_in_row + 1
        return compute

    def _head(self, original, *args, **kwargs):
        output = super()._head(original, *args, **kwargs)
        if self.config.calibrate and len(self._wrapped) == 1:  # one block: head and tail at once
            self._measure_output(self.state(self.state_type), output)
        return output

    def _tail(self, original, *args, **kwargs):
        output = super()._tail(original, *args, **kwargs)
        if self.config.calibrate:
            self._measure_output(self.state(self.state_type), output)
        return output

    def _measure_output(self, state: _State, output) -> None:
        """Calibrating: y = Σ|o − o'| / Σ|o'|, o the last block's output hidden states over this
        rank's real tokens and o' the branch's previous one, both sums in float64 and added over
        the ranks that share the blocks (`Agreement.ratio`), so N ranks measure what one does;
        recorded with the forward's x once both exist."""
        hidden = output[0] if isinstance(output, tuple) else output
        rows = self.valid_tokens()
        now = hidden if rows is None else hidden[:, :rows]
        before, state.previous_output = state.previous_output, now
        if before is None:
            return
        change = self.agreement.ratio((now - before).abs().sum(dtype=torch.float64),
                                      before.abs().sum(dtype=torch.float64))
        if state.change is not None:
            self.pairs.append((self.step, self.context, state.change, change))

    def _read(self, args, kwargs) -> tuple[torch.Tensor, bool]:
        current, split = self.indicator(self.head, args, kwargs)
        if split:
            self.decides = "data-dependent"
            rows = self.valid_tokens()
            if rows is not None:
                current = current[:, :rows]
        return current, split


def apply_teacache(transformer, config: TeaCacheConfig, *, group=None, blocks: list[torch.nn.Module],
                   hints: CacheHints, valid_tokens: Callable[[], int | None] = lambda: None,
                   stats=None) -> TeaCache:
    """Apply TeaCache to `transformer`'s `blocks` (in execution order), reading the indicator the
    model family's `hints` name. `group`: the ranks that share the blocks' collectives, over which
    a split indicator's sums are agreed (and verify mode's cross-check); `valid_tokens()`: real
    tokens at the start of this rank's shard."""
    return TeaCache(transformer, config, blocks=blocks, valid_tokens=valid_tokens, hints=hints,
                    agreement=Agreement(group=group, stats=stats, verify=config.verify))


def _attach(transformer, config: TeaCacheConfig, site: Site) -> TeaCache:
    return apply_teacache(transformer, config, group=site.group, blocks=site.blocks, valid_tokens=site.valid_tokens,
                          hints=site.hints, stats=site.stats)


def _check_model(family: str, read) -> None:
    """HunyuanVideo I2V's token_replace blocks modulate the picture's tokens apart: TeaCache's
    HunyuanVideo indicator (one modulation for every image token) does not describe them."""
    if read("transformer/config.json").get("image_condition_type") == "token_replace":
        raise ValueError(f"TeaCache has no indicator for {family}'s token_replace blocks (the picture's tokens "
                         f"carry their own modulation); use another cache kind")


def state_per_token(shape: ModelShape, config: TeaCacheConfig) -> float:
    """Per token and branch: the block stack's residual, and with joint text (HunyuanVideo) the
    indicator too (the first block's modulated image tokens); Wan's indicator is the timestep
    modulation, nothing per token."""
    return 2 if shape.joint_text else 1


# Skip share assumed: 0.5. TeaCache's README (../shared/cache-facts.md section 3.1): Wan 2.1 1.3B at
# threshold 0.08 takes 88 s of the uncached 175 s on an A800 (MagCache's README: 95 s of 189 s),
# so about half the steps skip.
DEGREE = 4
"""Degree of the polynomial a calibration fits (TeaCache's published fits are 4th degree)."""
COEFFICIENT_DIGITS = 10
"""Significant digits a calibration writes per coefficient (TeaCache publishes 9)."""


def fit(pairs: list[tuple[int, str, float, float]], *, expert: str) -> tuple[float, ...]:
    """The degree-4 least-squares polynomial y ~ poly(x) over every (x, y) pair, highest power
    first. ValueError when fewer than 5 distinct x were measured."""
    import numpy as np

    x = np.array([p[2] for p in pairs], dtype=np.float64)
    y = np.array([p[3] for p in pairs], dtype=np.float64)
    if len(set(x.tolist())) <= DEGREE:
        raise ValueError(f"{expert} measured {len(set(x.tolist()))} distinct indicator changes; a "
                         f"degree-{DEGREE} fit needs at least {DEGREE + 1}: give more --steps")
    return tuple(float(c) for c in np.polyfit(x, y, DEGREE))


def _calibrated(caches: dict):
    """One polynomial per expert: the first as `cache`, a second (Wan 2.2 A14B's low-noise
    expert) as `cache_2`."""
    fits = [fit(cache.pairs, expert=name) for name, cache in caches.items()]
    configs = [TeaCacheConfig(coefficients=tuple(float(f"{c:.{COEFFICIENT_DIGITS}g}") for c in coefficients))
               for coefficients in fits]
    pairs = ", ".join(f"{name} {len(cache.pairs)}" for name, cache in caches.items())
    return (configs[0], configs[1] if len(configs) > 1 else None,
            "TeaCache polynomial fitted by `unison calibrate` (output change against indicator change)",
            f"TeaCache coefficients fitted on (x, y) pairs: {pairs}")


CALIBRATION = Calibration(min_steps=DEGREE + 2,
                          why=f"{DEGREE + 1} changes of the indicator for a degree-{DEGREE} fit",
                          config=lambda: TeaCacheConfig(calibrate=True), result=_calibrated)


KIND = Kind(name="teacache", title="TeaCache", config=TeaCacheConfig, attach=_attach, decides="data-dependent",
            check_model=_check_model, presets=PRESETS, saves=Saves.BLOCK_STACK, state_per_token=state_per_token,
            default_skip_share=0.5, calibration=CALIBRATION)
"""Data-dependent where the indicator is split with the tokens (HunyuanVideo, Wan 2.2 TI2V-5B);
on Wan 2.1 and Wan 2.2 A14B each applied cache says schedule-only (`TeaCache.decides`)."""
