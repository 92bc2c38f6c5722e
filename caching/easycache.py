"""EasyCache (Zhou et al., arXiv 2507.02860): skip the whole transformer while the input's change,
scaled by the model's learned transformation rate, accumulates to little; reuse the last
computed forward's output − input.

At each step s of the conditional branch, with x_s the transformer's latent input, x' the
branch's input at its previous step (computed or skipped), and (x°, y°) the input and output of
its last computed forward:

    pred  = k · mean|x_s − x'| / mean|y°|
    acc  += pred
    skip  iff  acc < threshold    otherwise compute, and acc = 0

and after every computed forward of the branch (from its second one on) the transformation rate
is measured again, k = mean|y_s − y°| / mean|x_s − x°|, before (x°, y°) become (x_s, y_s). The
first `warmup_steps` steps, the last step (`compute_last`), a step after `max_consecutive_skips`
skips in a row, and every step before k is known (the branch's first two computes) compute with
acc = 0 and nothing measured. The unconditional forward of a step takes the conditional one's
decision, and a skipped forward of either branch returns its input plus that branch's own cached
y° − x°. This is the rule of EasyCache's code (H-EmbodVis/EasyCache @3149a41,
EasyCache4Wan2.2/easycache_generate.py, `easycache_forward`: the cond-only decision block, the
"Update cache" block after unpatchify; HunyuanVideo-EasyCache/easycache_sample_video.py the same
with one branch): strict `<`, x' updated at every conditional call, k from the last two computed
forwards, `ret_steps` counted in calls there and in steps here (Wan ret_steps 10·2 calls = 10
steps; HunyuanVideo 5). The means run in float64 here. An image-conditioned input carries more
channels than the output (the image latents): only the output's leading channels are compared
and reused, as EasyCache reads the latents before the image is concatenated.

Decisions: data-dependent, computed on tensors every rank holds whole. The transformer's forward
sees the whole latents and returns the whole output on every rank (the sequence is split at the
first block and gathered after the last), so the ranks that share the blocks compute the same
means from identical tensors and issue no collective (a test counts them). Under CFG parallelism
the unconditional half never sees the conditional input, so the decision value is agreed over
both halves (`Agreement.ratio` over the site's cfg_group, one float64 all-reduce): the first
conditional rank of its sequence group contributes (acc + pred, 1), every other rank zeros, and
every rank reads the same value. Forced decisions depend only on the step and the shared decision
history and issue no collective. Not under PipeFusion (the whole-model output is gathered per
stage there; the gate protocol First-Block Cache has would be needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from unison.caching.agree import Agreement
from unison.caching.base import Cache, CacheConfig, Kind, Site
from unison.caching.planning import ModelShape, Saves

LEADER = "cond"
"""The cache context that decides for both branches."""


@dataclass(frozen=True, kw_only=True)
class EasyCacheConfig(CacheConfig):
    kind: str = field(default="easycache", init=False)
    """easycache."""
    threshold: float = 0.05
    """Skip while the accumulated predicted change is below this (EasyCache's Wan default; its
    HunyuanVideo default is 0.025). 0 never skips."""
    warmup_steps: int = 10
    """The first steps always compute (EasyCache's ret_steps: 10 steps on Wan, 5 on HunyuanVideo)."""
    compute_last: bool = True
    """The last step always computes (as EasyCache does)."""
    max_consecutive_skips: int | None = None
    """After this many skips in a row, compute (None: no limit, as published)."""

    def __post_init__(self):
        super().__post_init__()
        self.at_least(threshold=0, warmup_steps=0)
        self.at_least(max_consecutive_skips=1, nullable=True)


@dataclass
class _State:
    """One branch's state."""

    previous_input: object = None
    """x': the input at the branch's previous step (the conditional branch only)."""
    computed_input: object = None
    """x°: the input of the last computed forward (the conditional branch only)."""
    computed_output: object = None
    """y°: the output of the last computed forward (the conditional branch only)."""
    reuse: object = None
    """y° − x° of this branch's last computed forward."""
    k: float | None = None
    """The transformation rate (the conditional branch only)."""
    accumulated: float = 0.0
    computes: int = 0
    skips_in_row: int = 0


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item()


class EasyCache(Cache):
    name = "easycache"
    decides = "data-dependent"
    unit = "forwards"
    saves = "transformer"
    state_type = _State

    def __init__(self, transformer, config: EasyCacheConfig, *, agreement: Agreement, cfg_parallel: bool,
                 speaker: bool):
        super().__init__(transformer)
        self.config = config
        self.agreement = agreement
        self.cfg_parallel = cfg_parallel
        """The other branch runs on other ranks: the decision value is agreed over both halves."""
        self.speaker = speaker
        """This rank's value is the one the agreement carries (the first rank of its sequence group)."""
        self.issues_collectives = cfg_parallel
        """Whether its (unforced) decisions issue a collective: only to reach the other CFG half."""
        self.values: list[tuple[int, float]] = []
        """(step, acc + pred) of every measured decision, for tests and tuning."""
        self._led: dict[int, bool] = {}
        """The conditional branch's decision per step, for the unconditional forward on this rank."""
        self._dtype: str | None = None
        """The transformer output's dtype (a skipped forward returns the same)."""
        self.wrap(transformer, self._forward)

    def reset(self) -> None:
        super().reset()
        self.values, self._led = [], {}

    def extra_state(self) -> dict:
        return {"led": dict(self._led), "values": list(self.values), "dtype": self._dtype}

    def load_extra_state(self, data: dict) -> None:
        self._led, self.values, self._dtype = dict(data["led"]), list(data["values"]), data["dtype"]

    def _forced(self, state: _State) -> bool:
        """Decisions taken from the step and the shared decision history alone (no message)."""
        limit = self.config.max_consecutive_skips
        last = self.config.compute_last and self.steps is not None and self.step == self.steps - 1
        return (self.step < self.config.warmup_steps or last or state.computes < 2
                or (limit is not None and state.skips_in_row >= limit))

    def _decide(self, state: _State, x: torch.Tensor) -> bool:
        leader = self.context == LEADER
        if not leader and not self.cfg_parallel:
            return self._led.get(self.step, True)  # no conditional forward this step: compute
        if self._forced(state):
            state.accumulated = 0.0
            return True
        value = 0.0
        if leader:
            latents = x[:, :state.reuse.shape[1]]
            pred = state.k * _mean_abs_diff(latents, state.previous_input) / \
                state.computed_output.double().abs().mean().item()
            value = state.accumulated + pred
        if self.cfg_parallel:  # the other half (and the rest of the sequence group) add zeros
            mine = leader and self.speaker
            device = x.device
            value = self.agreement.ratio(torch.tensor(value if mine else 0.0, dtype=torch.float64, device=device),
                                         torch.tensor(1.0 if mine else 0.0, dtype=torch.float64, device=device))
        self.values.append((self.step, value))
        if value < self.config.threshold:
            state.accumulated = value
            return False
        state.accumulated = 0.0
        return True

    def _forward(self, original, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        state = self.state(_State)
        compute = self._decide(state, hidden)
        if self.context == LEADER:
            self._led[self.step] = compute
        self.agreement.check(compute, step=self.step, cache=self.name, context=self.context)
        self.record("forward", compute)
        if compute:
            output = original(*args, **kwargs)
            sample = output[0] if isinstance(output, tuple) else output.sample
            self._dtype = str(sample.dtype).removeprefix("torch.")
            self._keep(state, hidden[:, :sample.shape[1]], sample)
            return output
        state.skips_in_row += 1
        latents = hidden[:, :state.reuse.shape[1]]
        if self.context == LEADER:
            state.previous_input = latents
        sample = (latents + state.reuse).to(getattr(torch, self._dtype))
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    def _keep(self, state: _State, x: torch.Tensor, y: torch.Tensor) -> None:
        """After a computed forward: the reused difference, and on the conditional branch the
        transformation rate and the history the next decisions read."""
        state.reuse = y - x
        state.computes += 1
        state.skips_in_row = 0
        if self.context != LEADER:
            return
        if state.computed_output is not None:
            change = _mean_abs_diff(x, state.computed_input)
            state.k = _mean_abs_diff(y, state.computed_output) / change if change else float("inf")
        state.previous_input = state.computed_input = x
        state.computed_output = y


def apply_easycache(transformer, config: EasyCacheConfig, *, group=None, cfg_group=None, stats=None) -> EasyCache:
    """Apply EasyCache to `transformer` (its whole forward). `group`: the ranks that share the
    blocks' collectives (verify mode's cross-check without CFG parallelism); `cfg_group`: those and
    the other CFG half's, over which the conditional branch's decision value is agreed (None
    without CFG parallelism: then no decision issues a collective)."""
    speaker = group is None or dist.get_rank(group=group) == 0
    agreement = Agreement(group=cfg_group if cfg_group is not None else group, stats=stats, verify=config.verify)
    return EasyCache(transformer, config, agreement=agreement, cfg_parallel=cfg_group is not None, speaker=speaker)


def _attach(transformer, config: EasyCacheConfig, site: Site) -> EasyCache:
    return apply_easycache(transformer, config, group=site.group, cfg_group=site.cfg_group, stats=site.stats)


def state_per_token(shape: ModelShape, config: EasyCacheConfig) -> float:
    """Nothing at the hidden size: its inputs, outputs and reuse are latent-sized (a few MB)."""
    return 0


# Skip share assumed: 0.6. EasyCache's README (../shared/cache-facts.md section 3.7): Wan 2.1 1.3B
# is 2.54x faster, about 60% of the forwards skipped.
KIND = Kind(name="easycache", title="EasyCache", config=EasyCacheConfig, attach=_attach, decides=EasyCache.decides,
            saves=Saves.WHOLE_TRANSFORMER, state_per_token=state_per_token, default_skip_share=0.6)
