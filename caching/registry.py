"""The cache kinds: the only place the engine, the CLI, the batch jobs and the shared test battery
look a cache up. A kind is one module of caching/ with its config class, `apply_…` and a `KIND`
entry (caching/base.py's `Kind`); adding one is a new module and one line below.

| kind     | decisions                                                       | module      |
|----------|-----------------------------------------------------------------|-------------|
| fbcache  | data-dependent                                                  | fbcache.py  |
| pab      | schedule-only                                                   | pab.py      |
| magcache | schedule-only                                                   | magcache.py |
| teacache | by model: schedule-only on Wan 2.1 / 2.2 A14B (the indicator is | teacache.py |
|          | the timestep modulation); data-dependent on HunyuanVideo and    |             |
|          | Wan 2.2 TI2V-5B (the indicator is split with the tokens)        |             |
| dbcache  | data-dependent (a static step mask's skips: schedule-only)      | dbcache.py  |
| easycache| data-dependent, on the whole latents every rank holds (no       | easycache.py|
|          | collective); agreed over both halves under CFG parallelism      |             |
| taylorseer| schedule-only                                                  | taylorseer.py|
"""

from __future__ import annotations

import dataclasses

import torch

from unison.caching import dbcache, easycache, fbcache, magcache, pab, taylorseer, teacache
from unison.caching.base import Cache, CacheConfig, Kind, NoCacheConfig, Site

NONE = "none"
KINDS: dict[str, Kind] = {entry.name: entry for entry in (fbcache.KIND, pab.KIND, magcache.KIND, teacache.KIND,
                                                               dbcache.KIND, easycache.KIND, taylorseer.KIND)}
"""Every cache kind by name, in the order they are listed to users."""


def names() -> list[str]:
    """What `cache.kind` may say: none, then every kind."""
    return [NONE, *KINDS]


def get(name: str) -> Kind:
    """The kind called `name`; ValueError naming the kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"unknown cache kind {name!r}; kinds: {', '.join(names())}")
    return KINDS[name]


def config_class(name: str) -> type[CacheConfig]:
    return NoCacheConfig if name == NONE else get(name).config


def fields(name: str) -> list[str]:
    """The fields a kind's config takes (kind first), for messages."""
    return [f.name for f in dataclasses.fields(config_class(name))]


def title(config: CacheConfig) -> str:
    return "no cache" if config.kind == NONE else get(config.kind).title


def apply(transformer: torch.nn.Module, config: CacheConfig, site: Site) -> Cache | None:
    """Apply the cache `config` describes to `transformer` at `site` (None for no cache)."""
    return None if config.kind == NONE else get(config.kind).attach(transformer, config, site)
