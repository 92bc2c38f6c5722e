"""model.compile=blocks (engine/compile.py) on the CPU with inductor: compiled equals eager, graphs
are compiled in the first step and never again, caches compose in either order.

Tolerance: float32, relative error of the final latents against the eager run at most 1e-4
(inductor fuses and reorders reductions; seen here: about 5e-7). The First-Block Cache threshold
sits between the tiny model's first-block changes at steps 1 and 2 (0.158-0.164 and 0.209-0.240
at this size, both seeds; compiled and eager agree to 1e-7), so the compiled run must skip and
compute exactly where the eager one does.

Compiling is the expensive part (tens of seconds per process on two cores, no inductor cache):
one tiny Wan at 32x32x5 (8 video tokens), three steps, and one spawn of two ranks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from multirank import run_ranks
from unison.engine.compile import compile_blocks
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine

TOLERANCE = 1e-4
FBCACHE = CacheConfig(kind="fbcache", threshold=0.185)
SCHEDULE = [True, True, False, False, True, True]
"""The eager one-rank skip schedule with FBCACHE: (step, branch) computes, step 1 skips in both branches."""


def _config(*, compile: str = "none", cache: CacheConfig = FBCACHE, seed: int = 0, **parallel) -> RunConfig:
    return RunConfig(model=ModelConfig(family="wan", compile=compile), cache=cache,
                     sampling=SamplingConfig(height=32, width=32, frames=5, steps=3, seed=seed),
                     parallel=ParallelConfig(timeout_s=300, **parallel),
                     output=OutputConfig(decode=False, progress=False))


def _graphs() -> tuple[int, int]:
    """(frames TorchDynamo has tried to compile, graphs it compiled) in this process so far."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def _compiled_render(engine: Engine, **parallel) -> dict:
    """Render twice (another seed the second time), noting the compile counters after each step."""
    after_step = []
    first = engine.render(on_step=lambda record: after_step.append(_graphs()))
    second = engine.render(_config(compile="blocks", seed=1, **parallel))
    return dict(latents=first.latents, second=second.latents, decisions=first.cache_decisions["transformer"],
                after_step=after_step, after_second=_graphs(),
                failed=counters["frames"]["total"] - counters["frames"]["ok"])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check_compiled_once(run: dict, before: tuple[int, int]) -> None:
    frames, graphs = run["after_step"][0]
    assert graphs > before[1], "nothing was compiled"
    assert run["failed"] == 0, "a frame failed to compile (it runs eagerly)"
    # After the first step no frame is compiled and no graph added, in the rest of the video or
    # in a second video.
    assert run["after_step"] == [(frames, graphs)] * len(run["after_step"])
    assert run["after_second"] == (frames, graphs)


@pytest.fixture(scope="module")
def eager():
    """The eager one-rank renders of both seeds (the references)."""
    engine = Engine.from_config(_config())
    first, second = engine.render(), engine.render(_config(seed=1))
    assert [d[-1] for d in first.cache_decisions["transformer"]] == SCHEDULE
    return first, second


def test_compiled_equals_eager_one_rank(eager, caplog):
    reference, reference_second = eager
    before = _graphs()
    with caplog.at_level(logging.INFO, logger="unison"):
        engine = Engine.from_config(_config(compile="blocks"))
    said = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
    assert said == ["compile transformer: 3 blocks compiled (3 x WanTransformerBlock; one graph set per class; "
                    "backend=inductor, dynamic=False, fullgraph=False)"]
    run = _compiled_render(engine)
    _check_compiled_once(run, before)
    # One block class, no graph break on one rank: the three blocks share one graph.
    assert run["after_step"][0][1] - before[1] == 1
    assert _relative(run["latents"], reference.latents) <= TOLERANCE
    assert _relative(run["second"], reference_second.latents) <= TOLERANCE
    assert run["decisions"] == reference.cache_decisions["transformer"]


def _ulysses(rank: int, world: int) -> dict:
    before = _graphs()  # the ranks are pooled processes: counters from earlier calls stay
    run = _compiled_render(Engine.from_config(_config(compile="blocks", ulysses=2), world_size=world), ulysses=2)
    return dict(run, before=before)


def test_compiled_equals_eager_ulysses_with_fbcache(eager):
    """Two ranks, Ulysses 2, First-Block Cache: each block is a few graphs around the eager
    all-to-all attention; the cache's agreement runs eagerly around the compiled first block.
    Compared with the one-rank eager run (invariants 2 and 3 hold compiled too)."""
    reference, reference_second = eager
    for run in run_ranks(2, _ulysses):
        _check_compiled_once(run, run["before"])
        assert _relative(run["latents"], reference.latents) <= TOLERANCE
        assert _relative(run["second"], reference_second.latents) <= TOLERANCE
        assert run["decisions"] == reference.cache_decisions["transformer"]


def test_cache_applied_before_or_after_compiling():
    """First-Block Cache wraps a block's forward on the instance and calls the class's forward,
    looked up at each call: compiling the blocks under an applied cache runs the compiled code
    beneath it, removing the cache leaves them compiled, and removing the compilation leaves
    the cache on eager blocks. (No new compilation: the graphs of the tests above serve.)"""
    engine = Engine.from_config(_config())
    reference = engine.render()  # applies the cache
    transformer, cache = engine.pipe.transformer, engine.caches["transformer"]
    compiled = compile_blocks(transformer, engine.plan.spec)
    compiled_class = type(transformer.blocks[0])
    calls = []
    original = compiled_class.forward
    compiled_class.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        result = engine.render()
        assert len(calls) == sum(3 if computed else 1 for *_, computed in result.cache_decisions["transformer"])
        assert result.cache_decisions == reference.cache_decisions
        assert _relative(result.latents, reference.latents) <= TOLERANCE
        cache.remove()
        assert all("forward" not in vars(block) and type(block) is compiled_class for block in transformer.blocks)
        calls.clear()
        engine.render(_config(cache=CacheConfig(kind="fbcache", threshold=0.19)))  # a cache over compiled blocks
        assert calls
    finally:
        compiled_class.forward = original
    compiled.remove()
    assert all(type(block).__name__ == "WanTransformerBlock" for block in transformer.blocks)
    assert torch.equal(engine.render().latents, reference.latents)
