"""Applying the configured step cache to a loaded pipeline (one cache per expert transformer).

The cache decides over the ranks that share the transformer blocks' collectives (sequence- or
patch-parallel). CFG-parallel halves run different branches (cache contexts), so each half
decides for its own branch, exactly as one rank decides per branch; with fbcache's joint_cfg the
conditional branch decides for both, agreed over both halves (the cfg_tokens group). Under patch
parallelism the deciding group is the patch group (`tokens`: every rank splitting the tokens);
under PipeFusion First-Block Cache gates the StageRunner, whose stage 0 holds the first block.
"""

from __future__ import annotations

import dataclasses

from unison.caching import (Cache, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, apply_first_block_cache,
                            apply_pyramid_attention_broadcast)
from unison.engine.config import CacheConfig
from unison.engine.models import ModelSpec

_CONFIGS = {"fbcache": FirstBlockCacheConfig, "pab": PyramidAttentionBroadcastConfig}


def cache_config(cache: CacheConfig) -> FirstBlockCacheConfig | PyramidAttentionBroadcastConfig | None:
    """The caching layer's config for `cache` (None for no cache), from the `cache` section's fields
    of the same names; ValueError names a bad field."""
    if cache.kind == "none":
        return None
    cls = _CONFIGS[cache.kind]
    return cls(**{f.name: getattr(cache, f.name) for f in dataclasses.fields(cls)})


def apply_caches(pipe, spec: ModelSpec, cache: CacheConfig, runtime=None) -> dict[str, Cache]:
    config = cache_config(cache)
    if config is None:
        return {}
    joint = cache.kind == "fbcache" and cache.joint_cfg and runtime is not None and runtime.dims.cfg > 1
    group = runtime.groups.get("cfg_tokens" if joint else "tokens") if runtime is not None else None
    stats = runtime.stats if runtime is not None else None
    applied = {}
    for name in spec.experts:
        transformer = getattr(pipe, name)
        runner = runtime.runners.get(name) if runtime is not None else None
        if cache.kind == "fbcache" and runner is not None:
            applied[name] = apply_first_block_cache(transformer, config, group=group, pipeline=runner, stats=stats)
        elif cache.kind == "fbcache":
            shard = runtime.shards.get(name) if runtime is not None else None
            blocks = [block for attr in spec.block_lists for block in getattr(transformer, attr)]
            applied[name] = apply_first_block_cache(
                transformer, config, group=group, blocks=blocks, stats=stats,
                valid_tokens=shard.local_valid if shard is not None else (lambda: None))
        else:
            applied[name] = apply_pyramid_attention_broadcast(
                transformer, config, group=group, attentions=spec.attention_modules(transformer), stats=stats)
    return applied


def describe(caches: dict[str, Cache]) -> list[str]:
    """Summary lines: per expert and context, forwards (fbcache) or attention calls (pab)
    computed and skipped, and the share of block or attention compute saved."""
    lines = []
    for expert, cache in caches.items():
        unit = "forwards" if cache.name == "fbcache" else "attention calls"
        counts = "; ".join(f"{context} {c['computed']} computed / {c['skipped']} skipped"
                           for context, c in cache.summary().items())
        prefix = f"{cache.name}" + (f" [{expert}]" if len(caches) > 1 else "")
        what = "block" if cache.name == "fbcache" else "attention"
        lines.append(f"{prefix}: {unit}: {counts}; ~{cache.saved_fraction():.0%} of {what} compute saved")
    return lines
