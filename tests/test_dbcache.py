"""DBCache (caching/dbcache.py): First-Block Cache with Fn front and Bn back blocks, its gates,
and its bad input. The shared battery (tests/test_cache_battery.py) covers the rest: never-skip
equals no cache, reset, resume, lockstep under every layout."""

from __future__ import annotations

import pytest
import torch

from test_cache_battery import _cached
from unison.engine.config import CacheConfig
from unison.engine.render import Engine
from unison.launch.cli import main


def _render(family: str, cache: CacheConfig, blocks_run: list | None = None):
    engine = Engine.from_config(_cached(family, cache))
    transformer = engine.pipe.transformer
    blocks = [b for attr in engine.plan.spec.block_lists for b in getattr(transformer, attr)]
    if blocks_run is not None:
        # An independent count of the blocks that really run: torch's hooks on their layers (a
        # block's own hooks fire even when the cache returns without running it).
        def ran(index):
            def hook(module, args):
                if not blocks_run or blocks_run[-1] != index:
                    blocks_run.append(index)
            return hook

        for index, block in enumerate(blocks):
            for layer in block.children():
                layer.register_forward_pre_hook(ran(index))
    return engine.render(), len(blocks)


def _flags(result, context: str) -> list[bool]:
    return [d[-1] for d in result.cache_decisions["transformer"] if d[1] == context]


def test_fbcache_is_dbcache_with_one_front_block_and_none_at_the_back():
    fb, _ = _render("wan", CacheConfig(kind="fbcache", threshold=0.115))
    db, _ = _render("wan", CacheConfig(kind="dbcache", threshold=0.115, front_blocks=1, back_blocks=0))
    assert fb.cache_decisions == db.cache_decisions and {False, True} <= set(_flags(db, "cond") + _flags(db, "uncond"))
    assert torch.equal(fb.latents, db.latents)


@pytest.mark.parametrize("family, front, back", [("wan", 1, 1), ("wan", 2, 0), ("hunyuanvideo", 2, 1)])
def test_skipped_forwards_run_the_front_and_back_blocks_only(family, front, back):
    """Counted with forward hooks: a computed forward runs every block, a skipped one the first
    Fn and the last Bn; the summary's saved share is the counted share."""
    ran: list[int] = []
    result, total = _render(family, CacheConfig(kind="dbcache", threshold=1e9, front_blocks=front, back_blocks=back,
                                                max_consecutive_skips=1), ran)
    decisions = [d[-1] for d in result.cache_decisions["transformer"]]
    assert decisions.count(False) > 0
    expected = [i for computed in decisions for i in range(total) if computed or i < front or i >= total - back]
    assert ran == expected
    saved = 1 - len(ran) / (len(decisions) * total)
    line = next(line for line in result.cache_lines if line.startswith("dbcache"))
    assert f"~{saved:.0%} of block compute saved" in line


def test_gates_max_cached_steps_and_the_step_mask():
    # A threshold every change passes: without gates every step after the first would skip.
    cap, _ = _render("wan", CacheConfig(kind="dbcache", threshold=1e9, max_cached_steps=1))
    assert _flags(cap, "cond") == _flags(cap, "uncond") == [True, False, True, True]
    mask, _ = _render("wan", CacheConfig(kind="dbcache", threshold=1e9, step_mask=(1, 0, 1, 0)))
    assert _flags(mask, "cond") == [True, False, True, False]
    # static: a 0 step skips whatever the change (threshold 0 would compute every step).
    static, _ = _render("wan", CacheConfig(kind="dbcache", threshold=0.0, step_mask=(1, 0, 0, 1), mask_policy="static"))
    assert _flags(static, "cond") == _flags(static, "uncond") == [True, False, False, True]
    dynamic, _ = _render("wan", CacheConfig(kind="dbcache", threshold=0.0, step_mask=(1, 0, 0, 1)))
    assert _flags(dynamic, "cond") == [True] * 4


@pytest.mark.parametrize("args, message", [
    (["--set", "cache.front_blocks=0"], "cache.front_blocks must be at least 1, got 0"),
    (["--set", "cache.back_blocks=-1"], "cache.back_blocks must be at least 0, got -1"),
    (["--set", "cache.step_mask=[1, 2]"], "cache.step_mask must be a list of 0 and 1"),
    (["--set", "cache.step_mask=[1, 0, 1]"], "cache.step_mask has 3 entries but the run has 4 steps"),
    (["--set", "cache.mask_policy=always"], "cache.mask_policy: expected 'dynamic' | 'static', got str 'always'"),
    (["--set", "cache.max_cached_steps=-2"], "cache.max_cached_steps must be at least 0"),
    (["--set", "cache.calibrator=foca"], "cache.calibrator: expected 'none' | 'taylorseer', got str 'foca'"),
    (["--set", "cache.calibrator_order=-1"], "cache.calibrator_order must be at least 0, got -1"),
    (["--set", "cache.front_blocks=2", "--set", "cache.back_blocks=1"],
     "cache: 2 front and 1 back blocks leave no block to cache of the transformer's 3: front + back must be below 3"),
])
def test_bad_dbcache_settings_are_one_line(tmp_path, capsys, args, message):
    code = main(["--steps", "4", "--cache", "dbcache", "--output", str(tmp_path / "v.mp4"),
                 "--set", "output.progress=false", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err[-3:]
    assert not list(tmp_path.iterdir())


def test_the_taylorseer_calibrator_adds_the_extrapolated_middle_residual():
    """Wan, Fn 1 Bn 1 (3 blocks: block 1 is the middle). torch hooks record block 1's residual
    (output − input) at every computed forward, and at every skipped one what the cache added to
    the front's output (block 1's input minus block 0's own output, recomputed from its input).
    Each skip must add r_last + (r_last − r_before) / gap · d, d the steps since the last computed
    step (order 1); with order 0 the calibrated run is the plain one, bitwise."""
    cache = CacheConfig(kind="dbcache", threshold=0.115, front_blocks=1, back_blocks=1, calibrator="taylorseer")
    engine = Engine.from_config(_cached("wan", cache))
    head, middle = engine.pipe.transformer.blocks[0], engine.pipe.transformer.blocks[1]
    calls: list[tuple[str, torch.Tensor]] = []
    head_inputs: list[tuple] = []
    head.register_forward_pre_hook(lambda m, args, kwargs: head_inputs.append((args, kwargs)), with_kwargs=True)

    def on_middle(module, args, kwargs, output):  # runs whether or not the cache ran the block
        if output is args[0]:  # passed over: a skipped forward; the input is front output + residual
            own_args, own_kwargs = head_inputs[-1]
            calls.append(("added", args[0] - type(head).forward(head, *own_args, **own_kwargs)))
        else:
            calls.append(("computed", output - args[0]))

    middle.register_forward_hook(on_middle, with_kwargs=True)
    result = engine.render()
    decisions = result.cache_decisions["transformer"]
    assert len(calls) == len(decisions) and [c[0] == "computed" for c in calls] == [d[-1] for d in decisions]
    checked = 0
    for context in ("cond", "uncond"):
        computed: list[tuple[int, torch.Tensor]] = []
        for (step, ctx, _, _), (what, tensor) in zip(decisions, calls):
            if ctx != context:
                continue
            if what == "computed":
                computed.append((step, tensor))
                continue
            (s1, r1), d = computed[-1], step - computed[-1][0]
            expected = r1 if len(computed) < 2 else r1 + (r1 - computed[-2][1]) / (s1 - computed[-2][0]) * d
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5)
            checked += len(computed) >= 2
    assert checked >= 1  # at least one skip extrapolated from two computed steps

    plain = Engine.from_config(_cached("wan", CacheConfig(kind="dbcache", threshold=0.115, front_blocks=1,
                                                          back_blocks=1))).render()
    order0 = Engine.from_config(_cached("wan", CacheConfig(
        kind="dbcache", threshold=0.115, front_blocks=1, back_blocks=1, calibrator="taylorseer",
        calibrator_order=0))).render()
    assert order0.cache_decisions == plain.cache_decisions and torch.equal(order0.latents, plain.latents)
    assert not torch.equal(result.latents, plain.latents)
