"""parallel.shard_weights: block weights sharded with FSDP2 over all ranks change nothing but
memory. Every case on 4 gloo ranks in one spawn: the one-rank latents (and, with First-Block
Cache, the one-rank skip schedule), and about 1/4 of the block weights held per rank."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from multirank import run_ranks
from test_parallel_engine import _config
from unison.engine.plan import plan_run
from unison.engine.config import CacheConfig, ParallelConfig
from unison.engine.render import Engine
from unison.engine.errors import UserError

# Tiny Wan at 48 px, 4 steps: first-block changes ~0.09-0.12, so this threshold mixes skips and computes.
FBCACHE = CacheConfig(kind="fbcache", threshold=0.105, verify=True)

# (family, layout, cache): every layout has 4 ranks; the shard group is always all 4 of them.
CASES = [
    ("wan", dict(ulysses=4), CacheConfig()),
    ("wan", dict(ulysses=2, cfg=2), FBCACHE),
    ("hunyuanvideo", dict(ring=2, cfg=2), CacheConfig()),
    ("wan2.2", dict(ring=2, ulysses=2), CacheConfig()),
]


def _case_config(family: str, layout: dict, cache: CacheConfig, *, shard: bool = True):
    config = _config(family, 48, ParallelConfig(**layout, shard_weights=shard, timeout_s=60))
    return dataclasses.replace(config, cache=cache)


def _block_params(engine: Engine, expert: str):
    transformer = getattr(engine.pipe, expert)
    blocks = [block for attr in engine.plan.spec.block_lists for block in getattr(transformer, attr)]
    return [p for block in blocks for p in block.parameters()]


def _render_all(rank, world):
    from torch.distributed.tensor import DTensor

    from unison.parallel.shard import apply_weight_sharding

    out = []
    for family, layout, cache in CASES:
        engine = Engine.from_config(_case_config(family, layout, cache), world_size=world)
        result = engine.render()
        local = {}
        for expert in engine.plan.spec.experts:
            params = _block_params(engine, expert)
            assert all(isinstance(p, DTensor) for p in params)
            local[expert] = sum(p.to_local().numel() * p.to_local().element_size() for p in params)
        out.append(dict(latents=result.latents, decisions=result.cache_decisions, local=local,
                        lines=result.parallel_lines, comm=result.comm_bytes_per_step))
    try:  # applying twice is refused (FSDP2 has no undo)
        apply_weight_sharding(engine.pipe.transformer, block_lists=engine.plan.spec.block_lists,
                              mesh_or_group=engine.runtime.groups.get("cfg_tokens"))
        out.append("applied twice")
    except RuntimeError as err:
        out.append(str(err))
    return out


def _references():
    """Per case: the one-rank render and its experts' whole block bytes (parameters counted on
    the unsharded model); and the bytes a rank sends to gather the first case's blocks once."""
    references, full = [], []
    for i, (family, layout, cache) in enumerate(CASES):
        # One rank with shard_weights on: nothing to shard, nothing changes (plain tensors).
        engine = Engine.from_config(_case_config(family, {}, cache))
        assert engine.runtime is None
        assert "shard_weights ignored" in " ".join(engine.plan.describe())
        references.append(engine.render())
        params = {e: _block_params(engine, e) for e in engine.plan.spec.experts}
        full.append({e: sum(p.numel() * p.element_size() for p in ps) for e, ps in params.items()})
        if i == 0:  # a rank sends its shards, padded to ceil(rows / 4) rows, to the 3 others per gather
            gathered = 3 * sum(-(-p.shape[0] // 4) * p[0].numel() * p.element_size() for p in params["transformer"])
    return references, full, gathered


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def _one_thread():
    """The tiny models gain nothing from intra-op threads, which only contend on a busy machine
    (the ranks run on one thread each too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_sharded_weights_equal_one_rank():
    with _one_thread():
        references, full, gathered = _references()
    flags = [d[-1] for d in references[1].cache_decisions["transformer"]]
    assert True in flags and False in flags  # a mixed schedule, so lockstep means something

    ranks = run_ranks(4, _render_all)
    for results in ranks:
        assert "already applied" in results[-1]
    for i, (family, layout, cache) in enumerate(CASES):
        one = references[i]
        for rank, results in enumerate(ranks):
            got = results[i]
            assert _rel(got["latents"], one.latents) <= 1e-5, (family, layout, rank)
            assert any("sharded over 4 ranks" in line for line in got["lines"])
            if i == 0:  # two guidance branches a step, every block gathered in each
                assert got["comm"]["weight_all_gather"] == 2 * gathered
            if cache.kind == "fbcache":  # each cfg half holds its own branch's context
                mine = {d[1] for d in got["decisions"]["transformer"]}
                assert len(mine) == 1
                assert got["decisions"]["transformer"] == [d for d in one.cache_decisions["transformer"]
                                                           if d[1] in mine]
        for expert, whole in full[i].items():
            held = [results[i]["local"][expert] for results in ranks]
            assert sum(held) == whole  # every byte on exactly one rank
            for h in held:  # dim-0 chunks: about a quarter each (small rows round unevenly)
                assert abs(h - whole / 4) <= 0.05 * whole / 4, (family, expert, held, whole)


@pytest.mark.parametrize("layout", [dict(patch=2), dict(patch=2, patch_mode="pipefusion")])
def test_shard_weights_refused_with_patches(layout):
    config = _config("wan", 48, ParallelConfig(**layout, shard_weights=True))
    with pytest.raises(UserError, match="shard_weights does not combine with patch parallelism"):
        plan_run(config, world_size=2)
