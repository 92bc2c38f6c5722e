"""What every cache shares: its config's base class, where it is applied (`Site`), wrapping
module forwards (and undoing it), state per cache context, the current step, and counts for the
run summary.

A cache is applied to one transformer (Wan 2.2's experts each get their own). The engine tells it
the video's step count (`begin_video`); the loop tells it the step (`begin_step`) and the branch
(`set_context("cond")` / `"uncond"`) before each forward; state never leaks between contexts, and
`reset()` (every new video) forgets all of it.

Every kind says how it decides (`Cache.decides`): "schedule-only" (the step, the timestep and
constants: every rank decides alike with no message) or "data-dependent" (from tensors, agreed
through `Agreement.ratio` over the ranks that share the skipped work before anyone branches).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

from unison.caching.planning import ModelShape, Saves

_MARK = "_unison_cache"


class _ByKind(type):
    """`CacheConfig(kind="fbcache", threshold=0.1)` builds the kind's own config class (found in
    the registry); a kind's class called directly takes its fields, and `kind` only if it is its own."""

    def __call__(cls, **fields):
        kind = fields.pop("kind", None)
        if cls is CacheConfig:
            from unison.caching.registry import config_class

            cls = config_class("none" if kind is None else kind)
        elif kind is not None and kind != cls.kind:
            raise ValueError(f"kind must be {cls.kind} for {cls.__name__}, got {kind!r}")
        return super(_ByKind, cls).__call__(**fields)


@dataclass(frozen=True, kw_only=True)
class CacheConfig(metaclass=_ByKind):
    """The fields every cache kind's config has; each kind subclasses it with its own fields and
    checks them (ValueError, one line, naming the field) when it is built."""

    kind: str = field(default="none", init=False)
    """Which step cache (caching/registry.py lists them); none: no cache."""
    verify: bool = False
    """Cross-check every cache decision across ranks; a disagreement raises an error naming the
    step, the cache and the ranks (costs one small collective per decision)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{f.name} must be a finite number, got {value}")

    def at_least(self, *, nullable: bool = False, **bounds: float) -> None:
        """ValueError (one line) for the first field below its bound; with `nullable` a None passes."""
        for name, low in bounds.items():
            value = getattr(self, name)
            if value is None and nullable:
                continue
            if value < low:
                raise ValueError(f"{name} must be at least {low}{' (or null)' if nullable else ''}, got {value}")

    def check_complete(self) -> None:
        """Checks that need the whole config (not one field at a time, as `--set` builds it):
        ValueError, one line. Called before anything loads."""

    def check_run(self, *, steps: int) -> None:
        """Checks against the run the config is used for (its denoising steps): ValueError, one
        line. Called before anything loads."""


@dataclass(frozen=True, kw_only=True)
class NoCacheConfig(CacheConfig):
    """No step cache."""

    kind: str = field(default="none", init=False)
    """none."""


@dataclass(frozen=True)
class CacheHints:
    """What the caches need to know of a model family's blocks, declared by the family
    (engine/models/<family>/) so that no cache names a model."""

    indicator: Callable[[torch.nn.Module, tuple, dict], tuple[torch.Tensor, bool]] | None = None
    """TeaCache's indicator: (first block, its args, its kwargs) -> (the tensor whose relative
    change TeaCache accumulates, whether it is per token, so split with the tokens)."""
    blocks_return_text: bool = False
    """The blocks return (hidden, text) rather than hidden alone (the text stream beside the video)."""
    predicted_modules: tuple[str, ...] = ()
    """TaylorSeer's full form: regular expressions (re.fullmatch on the module names in the
    transformer) of the modules it predicts by default."""


@dataclass(frozen=True, kw_only=True)
class Site:
    """Where a cache goes: one transformer as the engine sees it, and the ranks that share it."""

    blocks: list[torch.nn.Module] = field(default_factory=list)
    """The transformer blocks in execution order (empty under PipeFusion)."""
    attentions: dict[str, list[torch.nn.Module]] = field(default_factory=dict)
    """{"self": [...], "cross": [...]}: the attention modules (empty under PipeFusion)."""
    pipeline: Any = None
    """The PipeFusion StageRunner that stands in for the blocks (None without PipeFusion)."""
    valid_tokens: Callable[[], int | None] = lambda: None
    """Real tokens at the start of this rank's shard (None: all of them)."""
    group: Any = None
    """The ranks that share the blocks' collectives (sequence- or patch-parallel; None: one)."""
    cfg_group: Any = None
    """Those ranks and the other CFG half's (None without CFG parallelism): for a decision one
    branch takes for both."""
    stats: Any = None
    """parallel.comm.CommStats counting this rank's collectives (None: not counted)."""
    hints: CacheHints = field(default_factory=CacheHints)
    """The model family's hints (TeaCache's indicator, TaylorSeer's modules)."""


class Cache:
    """Base of every cache kind."""

    name = "cache"
    decides: Literal["schedule-only", "data-dependent"] = "data-dependent"
    """How its decisions are made (see the module docstring)."""
    issues_collectives = True
    """Whether its data-dependent decisions send anything: False for a kind that decides on tensors
    every rank holds whole (EasyCache without CFG parallelism)."""
    unit = "forwards"
    """What one decision is about, for the summary line (forwards, attention calls)."""
    saves = "block"
    """What a skip saves, for the summary line (block, attention)."""
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
        self.steps: int | None = None
        """The video's denoising steps (`begin_video`), for kinds whose schedule needs them."""
        self.states: dict[str, Any] = {}
        self.decisions: list[tuple] = []
        """(step, context, what, computed) for every decision, in order: the skip schedule."""
        self._wrapped: list[tuple[torch.nn.Module, Callable[..., Any] | None]] = []
        """(module, the instance `forward` it had before, or None)."""
        setattr(transformer, _MARK, self)

    # -- what the engine and the loop call ----------------------------------------------------
    def begin_video(self, *, steps: int) -> None:
        """The next video has `steps` denoising steps (before the loop's `reset`)."""
        self.steps = steps

    def begin_step(self, index: int, timestep: float) -> None:
        self.step, self.timestep = index, float(timestep)

    @property
    def own_step(self) -> int:
        """This cache's step within the video: steps since its transformer first ran (the loop's
        step on one transformer; Wan 2.2's low-noise expert counts from 0 at the boundary, as a
        diffusers or cache-dit hook on that transformer does). Read off the decision log, so a
        resumed video counts on."""
        return self.step - self.decisions[0][0] if self.decisions else 0

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

    # -- step checkpoints (engine/io/checkpoint.py) ------------------------------------------------
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

    def saved_fraction(self) -> float:
        """Share of the `saves` compute not run (a kind that runs part of a skipped unit says less)."""
        return self.skipped_share()


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How `unison calibrate --cache KIND` measures a model for a kind: one render that never
    skips, with every expert's cache in calibration mode, turned into the kind's config."""

    min_steps: int
    """Fewest denoising steps a measurement needs."""
    why: str
    """Why (for the error when a run has fewer)."""
    config: Callable[[], CacheConfig]
    """The config that measures (calibration mode: never skips)."""
    result: Callable[[dict[str, Cache]], tuple[CacheConfig, CacheConfig | None, str, str]]
    """(each expert's cache after the render, by name in the experts' order) -> (cache, cache_2
    or None, the recipe's header, the line printed); ValueError (one line) for a measurement that
    cannot give one."""
    link: Callable[[list[Cache]], None] | None = None
    """Before the render's first step: what each expert's cache learns of the one before it."""


@dataclass(frozen=True, kw_only=True)
class Kind:
    """One registry entry (caching/registry.py): everything the engine knows about a cache kind."""

    name: str
    """What `cache.kind` says."""
    title: str
    """Its name in messages."""
    config: type[CacheConfig]
    """Its config class (fields, defaults, checks)."""
    attach: Callable[[torch.nn.Module, CacheConfig, Site], Cache]
    """(transformer, config, site) -> the applied cache: picks what it needs from the site and
    calls the module's `apply_…`."""
    decides: Literal["schedule-only", "data-dependent"]
    """How its decisions are made (see the module docstring)."""
    pipefusion: bool = False
    """Works under PipeFusion (the blocks split into stages); otherwise a clear error."""
    check_model: Callable[[str, Callable[[str], dict]], None] | None = None
    """(family, read) -> ValueError (one line) for a model the kind cannot take, where `read(name)`
    gives one of the folder's config files as a dict ({} when absent): checked before loading."""
    calibration: Calibration | None = None
    """How `unison calibrate` measures it (None: it is not calibrated)."""
    presets: Mapping[str, Any] | None = None
    """Its published settings by name (`cache.preset` names one), for a kind whose numbers were
    calibrated per checkpoint; engine/cache_presets.py picks one for a model folder. None: none."""

    # What `unison plan` needs (caching/planning.py); every kind declares them.
    saves: Saves
    """What a skipped step does not run, for the projected time."""
    state_per_token: Callable[[ModelShape, CacheConfig], float]
    """(shape, config) -> hidden-size tensors per video token the cache keeps per cache context
    (guidance branch and expert) at its largest; the planner multiplies it by the contexts, the
    rank's tokens, the hidden size and the bytes per element."""
    default_skip_share: float | None
    """Share of the steps the planner assumes the kind skips when the user gives none; None for a
    kind whose schedule says it exactly (`schedule_skip_share`)."""
    schedule_skip_share: Callable[[CacheConfig, int], float] | None = None
    """(config, steps) -> the share of steps a schedule-only kind skips, counted from its schedule;
    None for a kind whose skips depend on the run (it declares `default_skip_share`)."""

    def __post_init__(self):
        if (self.default_skip_share is None) == (self.schedule_skip_share is None):
            raise ValueError(f"kind {self.name}: give default_skip_share or schedule_skip_share, one of them")
        if self.default_skip_share is not None and not 0 <= self.default_skip_share < 1:
            raise ValueError(f"kind {self.name}: default_skip_share must be in [0, 1), got {self.default_skip_share}")
