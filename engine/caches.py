"""Applying the configured step cache to a loaded pipeline (one cache per expert transformer).

The engine knows a cache only by its config and the registry (caching/registry.py): here it
describes each transformer as a `Site` (its blocks and attention modules, the PipeFusion
StageRunner standing in for the blocks, the real tokens of this rank's shard, and the groups)
and the kind takes what it needs. The cache decides over the ranks that share the transformer
blocks' collectives (sequence- or patch-parallel: `tokens`). CFG-parallel halves run different
branches (cache contexts), so each half decides for its own branch, exactly as one rank decides
per branch; a kind whose conditional branch decides for both (fbcache's joint_cfg) agrees over
both halves (`cfg_tokens`, the site's cfg_group).
"""

from __future__ import annotations

from unison.caching import Cache, registry
from unison.caching.base import CacheConfig, Site
from unison.engine.models import ModelSpec
from unison.engine.errors import UserError


def _site(transformer, spec: ModelSpec, name: str, runtime) -> Site:
    runner = runtime.runners.get(name) if runtime is not None else None
    if runtime is None:
        groups = dict(group=None, cfg_group=None, stats=None)
    else:
        groups = dict(group=runtime.groups.get("tokens"), stats=runtime.stats,
                      cfg_group=runtime.groups.get("cfg_tokens") if runtime.dims.cfg > 1 else None)
    if runner is not None:
        return Site(pipeline=runner, hints=spec.cache_hints, **groups)
    shard = runtime.shards.get(name) if runtime is not None else None
    return Site(blocks=[block for attr in spec.block_lists for block in getattr(transformer, attr)],
                attentions=spec.attention_modules(transformer) if spec.attention_modules is not None else {},
                valid_tokens=shard.local_valid if shard is not None else (lambda: None), hints=spec.cache_hints,
                **groups)


def expert_caches(spec: ModelSpec, cache: CacheConfig,
                  cache_2: CacheConfig | None = None) -> dict[str, tuple[str, CacheConfig]]:
    """Per expert transformer: (the config section it reads, its cache config). Wan 2.2 A14B's
    low-noise expert (the second) takes `cache_2` when it is given, `cache` otherwise."""
    out = {}
    for index, name in enumerate(spec.experts):
        second = index > 0 and cache_2 is not None
        out[name] = ("cache_2", cache_2) if second else ("cache", cache)
    return out


def apply_caches(pipe, spec: ModelSpec, cache: CacheConfig, runtime=None, *,
                 cache_2: CacheConfig | None = None) -> dict[str, Cache]:
    """Apply each expert's cache (`expert_caches`); the kinds may differ between the experts."""
    applied = {}
    for name, (section, config) in expert_caches(spec, cache, cache_2).items():
        transformer = getattr(pipe, name)
        try:
            made = registry.apply(transformer, config, _site(transformer, spec, name, runtime))
        except ValueError as err:  # what only the loaded model tells (its block count)
            raise UserError(f"{section}: {err}") from None
        if made is not None:
            applied[name] = made
    return applied


def schedule(decisions: list[tuple], steps: int) -> dict[str, str]:
    """Per context, one mark per step: C every unit computed, S every unit skipped, p some of each
    (a Pyramid Attention Broadcast step that reuses some attentions), . not this cache's step (the
    other expert's, on Wan 2.2)."""
    marks: dict[str, list[set[bool]]] = {}
    for step, context, _, computed in decisions:
        marks.setdefault(context, [set() for _ in range(steps)])[step].add(computed)
    sign = {frozenset(): ".", frozenset({True}): "C", frozenset({False}): "S"}
    return {context: "".join(sign.get(frozenset(seen), "p") for seen in per_step)
            for context, per_step in sorted(marks.items())}


def describe(caches: dict[str, Cache]) -> list[str]:
    """Summary lines: per expert and context, the units (forwards, attention calls) computed and
    skipped, the share of block or attention compute saved, and the skip schedule (`schedule`)."""
    lines = []
    steps = 1 + max((d[0] for cache in caches.values() for d in cache.decisions), default=-1)
    for expert, cache in caches.items():
        counts = "; ".join(f"{context} {c['computed']} computed / {c['skipped']} skipped"
                           for context, c in cache.summary().items())
        prefix = f"{cache.name}" + (f" [{expert}]" if len(caches) > 1 else "")
        marks = ", ".join(f"{context} {line}" for context, line in schedule(cache.decisions, steps).items())
        lines.append(f"{prefix}: {cache.unit}: {counts}; ~{cache.saved_fraction():.0%} of {cache.saves} "
                     f"compute saved; schedule {marks or '-'}")
    return lines
