"""Pyramid Attention Broadcast: inside a timestep window, an attention's output is computed every
few steps and reused in between, with separate ranges for self- and cross-attention (the PAB
paper reuses cross-attention longest and self-attention least).

Decisions depend only on the step and the timestep, never on tensor data, so every rank takes
them identically without a message; verify mode cross-checks that anyway. A reused attention
skips its collectives too (Ulysses' all-to-alls, Ring's K/V passes): with sequence parallelism,
that is where PAB saves communication.

Decisions: schedule-only (the step and the timestep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unison.caching.agree import Agreement
from unison.caching.base import Cache, CacheConfig, Kind, Site
from unison.caching.planning import ModelShape, Saves


@dataclass(frozen=True, kw_only=True)
class PyramidAttentionBroadcastConfig(CacheConfig):
    kind: str = field(default="pab", init=False)
    """pab."""
    self_skip_range: int | None = 2
    """Inside its window, self-attention (HunyuanVideo: joint attention) is computed every this many
    steps and reused in between. None or 1: always computed."""
    self_timestep_min: float = 100.0
    """Self-attention's window is timesteps strictly between min and max."""
    self_timestep_max: float = 800.0
    """Upper end of self-attention's window."""
    cross_skip_range: int | None = 6
    """The same for cross-attention to the text (Wan)."""
    cross_timestep_min: float = 100.0
    """Lower end of cross-attention's window."""
    cross_timestep_max: float = 800.0
    """Upper end of cross-attention's window."""

    def __post_init__(self):
        super().__post_init__()
        for kind in ("self", "cross"):
            skip, lo, hi = self.rule(kind)
            if skip is not None and skip < 1:
                raise ValueError(f"{kind}_skip_range must be at least 1 (or null), got {skip}")
            if lo < 0:  # timesteps run from about 1000 down to 0
                raise ValueError(f"{kind}_timestep_min must be at least 0, got {lo}")
            if lo >= hi:
                raise ValueError(f"{kind}_timestep_min ({lo}) must be below {kind}_timestep_max ({hi})")

    def rule(self, kind: str) -> tuple[int | None, float, float]:
        if kind == "self":
            return self.self_skip_range, self.self_timestep_min, self.self_timestep_max
        return self.cross_skip_range, self.cross_timestep_min, self.cross_timestep_max


@dataclass
class _State:
    calls: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, object] = field(default_factory=dict)


class PyramidAttentionBroadcast(Cache):
    name = "pab"
    decides = "schedule-only"
    unit = "attention calls"
    saves = "attention"
    state_type = _State

    def __init__(self, transformer, config: PyramidAttentionBroadcastConfig, *,
                 attentions: dict[str, list[torch.nn.Module]], agreement: Agreement):
        for kind in attentions:
            if kind not in ("self", "cross"):
                raise ValueError(f"attention kind must be self or cross, got {kind!r}")
        super().__init__(transformer)
        self.config, self.agreement = config, agreement
        self.calls_per_forward = sum(len(modules) for modules in attentions.values())
        index = 0
        for kind, modules in attentions.items():
            for module in modules:
                self.wrap(module, self._make_forward(kind, index))
                index += 1

    def _make_forward(self, kind: str, index: int):
        skip, lo, hi = self.config.rule(kind)

        def forward(original, *args, **kwargs):
            state = self.state(_State)
            calls = state.calls.get(index, 0)
            state.calls[index] = calls + 1
            compute = (skip is None or skip == 1 or index not in state.outputs
                       or not lo < self.timestep < hi or calls % skip == 0)
            self.agreement.check(compute, step=self.step, cache=f"{self.name} {kind}-attention {index}",
                                 context=self.context)
            self.record(kind, compute)
            if not compute:
                return state.outputs[index]
            output = original(*args, **kwargs)
            if skip not in (None, 1):  # an output this kind never reuses is not kept (nor checkpointed)
                state.outputs[index] = output
            return output

        return forward


def apply_pyramid_attention_broadcast(transformer, config: PyramidAttentionBroadcastConfig, *, group=None,
                                      attentions: dict[str, list[torch.nn.Module]],
                                      stats=None) -> PyramidAttentionBroadcast:
    """Apply PAB to the attention modules `attentions` ({"self": [...], "cross": [...]}) of
    `transformer`. `group` is only used by verify mode (decisions need no agreement)."""
    return PyramidAttentionBroadcast(transformer, config, attentions=attentions,
                                     agreement=Agreement(group=group, stats=stats, verify=config.verify))


def _attach(transformer, config: PyramidAttentionBroadcastConfig, site: Site) -> PyramidAttentionBroadcast:
    return apply_pyramid_attention_broadcast(transformer, config, group=site.group, attentions=site.attentions,
                                             stats=site.stats)


def state_per_token(shape: ModelShape, config: PyramidAttentionBroadcastConfig) -> float:
    """One output per attention module and branch: Wan's self- and cross-attention of every block;
    HunyuanVideo's one joint attention per block."""
    return shape.blocks * (1 if shape.joint_text else 2)


# Skip share assumed: 0.35. The bundled schedule recomputes self-attention every 2nd step in
# timesteps 100..800, about 70% of the steps. (EasyCache's README, ../shared/cache-facts.md
# section 3.7, measures PAB at 1.72x on Wan 2.1 1.3B and 1.17x on HunyuanVideo, with other settings.)
KIND = Kind(name="pab", title="Pyramid Attention Broadcast", config=PyramidAttentionBroadcastConfig,
            attach=_attach, decides=PyramidAttentionBroadcast.decides, saves=Saves.ATTENTION,
            state_per_token=state_per_token, default_skip_share=0.35)
