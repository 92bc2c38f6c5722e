"""Step caches whose decisions ranks agree on: First-Block Cache, Pyramid Attention Broadcast,
MagCache, TeaCache. Each kind is one module; caching/registry.py is where the engine finds them."""

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
