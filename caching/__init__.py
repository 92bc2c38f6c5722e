"""Step caches whose decisions every rank takes alike.

- base: CacheConfig, Cache, Site (where a cache goes), CacheHints (what a model family tells the
  caches), Calibration, and Kind: everything the engine and the planner know of a kind
- agree: the agreement primitive (sums and counts over exactly the ranks that share the work)
- registry: the kinds, the only place they are looked up
- planning: what the planner hands a kind (ModelShape, StepWork, Saves)
- one module per kind: fbcache, pab, magcache (with magcache_presets), teacache, dbcache,
  easycache, taylorseer; stack: the whole-stack reuse several share
Nothing outside caching/ tests a kind's name; caching/ uses parallel/ for its collectives only."""

from unison.caching.agree import Agreement, CacheDisagreement
from unison.caching.base import Cache, CacheConfig, Kind, NoCacheConfig, Site
from unison.caching.fbcache import FirstBlockCache, FirstBlockCacheConfig, apply_first_block_cache
from unison.caching.magcache import MagCache, MagCacheConfig, apply_mag_cache
from unison.caching.pab import (PyramidAttentionBroadcast, PyramidAttentionBroadcastConfig,
                                apply_pyramid_attention_broadcast)
from unison.caching.teacache import TeaCache, TeaCacheConfig, apply_teacache
from unison.caching import registry

__all__ = ["Agreement", "Cache", "CacheConfig", "CacheDisagreement", "FirstBlockCache", "FirstBlockCacheConfig",
           "Kind", "MagCache", "MagCacheConfig", "NoCacheConfig", "PyramidAttentionBroadcast",
           "PyramidAttentionBroadcastConfig", "Site", "TeaCache", "TeaCacheConfig", "apply_first_block_cache",
           "apply_mag_cache", "apply_pyramid_attention_broadcast", "apply_teacache", "registry"]
