"""unison: render video with diffusion transformers on one or many GPUs.

The import package's subpackages are the repository's top-level folders: `unison.engine`,
`unison.parallel`, `unison.caching`, `unison.launch` and `unison.configs`. Layering is one way:
launch -> engine -> {parallel, caching}; caching uses parallel's collectives; nothing imports
launch; unison.engine.errors is for every layer (tests/test_layout.py holds it).
"""

__version__ = "0.1.0"
