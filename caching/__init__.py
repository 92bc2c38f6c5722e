"""Step caches (First-Block Cache, Pyramid Attention Broadcast) whose decisions ranks agree on."""

from unison.caching.agree import Agreement, CacheDisagreement
from unison.caching.base import Cache
from unison.caching.fbcache import FirstBlockCache, FirstBlockCacheConfig, apply_first_block_cache
from unison.caching.pab import (PyramidAttentionBroadcast, PyramidAttentionBroadcastConfig,
                                apply_pyramid_attention_broadcast)

__all__ = ["Agreement", "Cache", "CacheDisagreement", "FirstBlockCache", "FirstBlockCacheConfig",
           "PyramidAttentionBroadcast", "PyramidAttentionBroadcastConfig", "apply_first_block_cache",
           "apply_pyramid_attention_broadcast"]
