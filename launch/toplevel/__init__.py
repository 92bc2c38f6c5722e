"""unison: render video with diffusion transformers on one or many GPUs.

The import package's subpackages are the repository's top-level folders:
`unison.engine`, `unison.parallel`, `unison.caching` and `unison.launch`.
"""

__version__ = "0.1.0"
