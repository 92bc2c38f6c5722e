"""What `unison plan` takes from each cache kind's registry entry (caching/planning.py), checked
against what the caches really do on the tiny models, for every kind in the registry (a new kind
is covered by adding its settings to test_cache_battery.SETTINGS):

- the state the planner counts (bytes per rank in its memory column) is the state the cache
  holds after a render: the per-token tensors left in its contexts;
- what a skip saves (`Kind.saves`) is what a skipped forward does not run, seen by probes on the
  modules of the tiny Wan transformer;
- a schedule-derived skip share is the share the cache skipped;
- a kind registered here is planned by its own declared numbers, and an unknown kind is refused.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from test_cache_battery import FAMILIES, KINDS, SETTINGS, _cached, _tuned
from unison.caching import registry
from unison.caching.base import CacheConfig, Kind
from unison.caching.planning import Saves
from unison.engine.planner import model as plan_model
from unison.engine.planner.hardware import Gpu
from unison.engine.planner.layouts import Layout, Setting, cache_setting, evaluate, memory
from unison.engine.render import Engine

TOY_GPU = Gpu("toy", bf16_tflops=1.0, memory_gib=80, nvlink_gbps=100.0, pcie_gbps=10.0, source="test")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def _planned(engine: Engine, config) -> tuple[plan_model.RealModel, Setting]:
    """The planner's model of the engine's tiny transformer at the run's size, and its setting."""
    spec, sampling = engine.plan.spec, config.sampling
    parts = plan_model.from_pipeline(engine.pipe, spec)
    latent = plan_model.latent_shape(spec, parts, height=sampling.height, width=sampling.width,
                                     frames=sampling.frames)
    model = plan_model.RealModel(spec, parts, latent, sampling.max_sequence_length)
    fields = cache_setting(model, config.cache, steps=sampling.steps, skip_share=None)
    return model, Setting(gpu=TOY_GPU, gpus=1, steps=sampling.steps, branches=2, **fields)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_planned_cache_state_is_what_the_cache_holds(kind, family):
    """After the mixed render every context's state is at its largest (the residuals, attention
    outputs or Taylor factors of its last computed step). The planner counts per-token state of
    the video tokens in bfloat16; the tiny render runs float32, so the tensors whose token axis is
    the video tokens are counted at 2 bytes an element. Text-token parts (HunyuanVideo's text
    residual, its attention's text outputs), Wan's timestep indicator (6 x hidden) and latent-sized
    tensors (EasyCache) are not per video token and the planner leaves them out, as the count here."""
    config = _cached(family, SETTINGS[kind].mixed[_tuned(family)])
    engine = Engine.from_config(config)
    engine.render()
    model, setting = _planned(engine, config)
    cache = engine.caches["transformer"]
    assert set(cache.states) == {"cond", "uncond"}  # one context per guidance branch, as planned
    held = sum(t.numel() * 2 for state in cache.states.values() for t in _tensors(state)
               if t.dim() >= 2 and t.shape[-2] == model.video_tokens)
    assert memory(model, Layout(), setting)["cache state"] == held, (kind, family)


def _ran_by_forward(engine: Engine) -> dict[tuple[int, str], set[str]]:
    """Probes on the tiny Wan transformer: which of its modules ran, per (step, context). A probe
    sits below any cache's wrapper (the patch embedding; in each block the self-attention's query
    projection and the MLP's first linear), so a module a cache passes over or reuses never fires."""
    transformer = engine.pipe.transformer
    ran: dict[tuple[int, str], set[str]] = {}

    def probe(name: str) -> None:
        cache = engine.caches["transformer"]  # applied when the render starts
        ran.setdefault((cache.step, cache.context), set()).add(name)

    probes = {"embed": transformer.patch_embedding}
    for i, block in enumerate(transformer.blocks):
        probes[f"attention {i}"] = block.attn1.to_q
        probes[f"mlp {i}"] = block.ffn.net[0].proj
    for name, module in probes.items():
        module.register_forward_pre_hook(lambda _m, _a, name=name: probe(name))
    return ran


EXPECTED_TO_RUN = {
    Saves.BLOCKS_AFTER_FIRST: lambda blocks: {"embed", "attention 0", "mlp 0"},
    Saves.BLOCK_STACK: lambda blocks: {"embed"},
    Saves.WHOLE_TRANSFORMER: lambda blocks: set(),
    Saves.ATTENTION: lambda blocks: {"embed", *(f"mlp {i}" for i in range(blocks))},
}
"""What a skipped forward still runs, by what the kind says a skip saves (with DBCache's
back blocks, the last block also runs: see the test)."""


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_skip_saves_is_what_a_skipped_forward_does_not_run(kind):
    """On the mixed Wan render, every (step, branch) whose decisions all skipped ran what
    `Kind.saves` leaves running, and nothing more. A kind that runs blocks at the back of a skipped
    forward (DBCache's back_blocks, 1 here) also runs those: the planner plans its default F1B0."""
    config = _cached("wan", SETTINGS[kind].mixed["wan"])
    engine = Engine.from_config(config)
    ran = _ran_by_forward(engine)
    result = engine.render()
    blocks = len(engine.pipe.transformer.blocks)
    skipped = {}
    for step, context, _, computed in result.cache_decisions["transformer"]:
        skipped[step, context] = skipped.get((step, context), True) and not computed
    assert any(skipped.values()), kind
    expected = EXPECTED_TO_RUN[registry.get(kind).saves](blocks)
    back = getattr(config.cache, "back_blocks", 0)
    expected |= {f"{part} {i}" for i in range(blocks - back, blocks) for part in ("attention", "mlp")}
    for key, all_skipped in skipped.items():
        if all_skipped:
            assert ran.get(key, set()) == expected, (kind, key)
        else:
            assert "embed" in ran[key], (kind, key)


@pytest.mark.parametrize("kind", [k for k in KINDS if registry.get(k).schedule_skip_share is not None])
def test_a_schedule_skip_share_is_the_share_the_cache_skips(kind):
    """A kind whose schedule says its skip share: the planner's share is the share of forwards the
    mixed Wan render skipped."""
    config = _cached("wan", SETTINGS[kind].mixed["wan"])
    engine = Engine.from_config(config)
    engine.render()
    _, setting = _planned(engine, config)
    assert setting.skip_source == "its schedule"
    assert setting.skip_share == engine.caches["transformer"].skipped_share() > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(CacheConfig):
    kind: str = dataclasses.field(default="toy", init=False)
    """toy."""


def _toy_kind(**declared) -> Kind:
    return Kind(name="toy", title="Toy Cache", config=ToyConfig, attach=lambda *args: None, decides="schedule-only",
                **declared)


def test_a_new_kind_is_planned_by_its_own_numbers(monkeypatch):
    """A kind registered here (a config with no fields, never applied) declares
    a skip of the whole transformer on 0.25 of the steps and 3 hidden-size tensors per token: the
    planner projects 0.75 of the uncached compute and 3 x 2 contexts x 36 tokens x 48 hidden x 2
    bytes of state for the tiny Wan run (36 video tokens: 3 frames of 3 x 4 patches; hidden 48)."""
    monkeypatch.setitem(registry.KINDS, "toy", _toy_kind(saves=Saves.WHOLE_TRANSFORMER,
                                                         state_per_token=lambda shape, config: 3,
                                                         default_skip_share=0.25))
    config = _cached("wan", ToyConfig())
    model, setting = _planned(Engine.from_config(_cached("wan", CacheConfig())), config)
    assert (setting.cache, setting.skip_share, setting.skip_source, setting.cache_states) == ("toy", 0.25, "assumed", 3)
    assert model.video_tokens == 36 and model.heads * model.head_dim == 48
    assert memory(model, Layout(), setting)["cache state"] == 3 * 2 * 36 * 48 * 2
    plain = evaluate(model, Layout(), dataclasses.replace(setting, cache=registry.NONE, skip_share=0.0))
    assert evaluate(model, Layout(), setting).compute_s == pytest.approx(plain.compute_s * 0.75, rel=1e-12)


def test_an_unknown_kind_is_refused_in_one_line():
    """The planner has no fallback: a kind the registry does not know is a ValueError naming the kinds."""
    kinds = ", ".join(registry.names())
    with pytest.raises(ValueError, match=f"^{re.escape(f'unknown cache kind {chr(39)}toy{chr(39)}; kinds: {kinds}')}$") as err:
        Setting(gpu=TOY_GPU, gpus=1, cache="toy", skip_share=0.5)
    assert "\n" not in str(err.value)


def test_a_kind_declares_one_skip_share():
    """Either an assumed share or a schedule's, never both or neither: the planner always has one."""
    for declared in ({"default_skip_share": None}, {"default_skip_share": 0.5,
                                                    "schedule_skip_share": lambda config, steps: 0.5}):
        with pytest.raises(ValueError, match="give default_skip_share or schedule_skip_share, one of them"):
            _toy_kind(saves=Saves.BLOCK_STACK, state_per_token=lambda shape, config: 1, **declared)
    with pytest.raises(ValueError, match=r"default_skip_share must be in \[0, 1\), got 1.0"):
        _toy_kind(saves=Saves.BLOCK_STACK, state_per_token=lambda shape, config: 1, default_skip_share=1.0)
