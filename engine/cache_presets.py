"""Which published cache preset fits a model folder: MagCache's ratios and TeaCache's coefficients
were calibrated by their authors on particular checkpoints, so a run that names neither a preset
nor its own numbers gets the preset of the checkpoint the folder holds, told from its family and
its transformer's config.json (no weights), and says so.

A folder is a published model when every expert's transformer/config.json has that model's
shape (its family lists its checkpoints, engine/models/<family>/; a key the file lacks reads as
null, diffusers' default for the keys that are null there). Checkpoints of one shape that were calibrated apart (Wan 2.1 I2V 14B 480P
and 720P, HunyuanVideo at 544p and 720p) are told apart by the run's video: its shorter side (a
portrait 480x832 video is 480p as 832x480 is); TI2V-5B's tables by whether an image is given.
A tiny in-process preset has no folder and never matches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from unison.caching import registry
from unison.caching.base import CacheConfig
from unison.engine.config import ModelConfig, SamplingConfig
from unison.engine.models import ModelSpec
from unison.engine.models.spec import Checkpoint, Pick
from unison.engine.errors import UserError


@dataclass(frozen=True)
class Detected:
    preset: str
    """The preset's name (in the kind's PRESETS)."""
    model: Checkpoint
    """The checkpoint the folder's shape is."""
    pick: Pick
    """Which of its presets the run's video took."""


def detect(kind: str, *, spec: ModelSpec, configs: list[dict], sampling: SamplingConfig) -> Detected | None:
    """The preset of `kind` for a folder of `spec`'s family whose experts' config.json are
    `configs`, or None."""
    for model in spec.checkpoints:
        if model.matches(configs):
            for pick in model.presets.get(kind, ()):
                if pick.fits(sampling):
                    return Detected(pick.preset, model, pick)
    return None


def looked_for(kind: str, spec: ModelSpec) -> list[str]:
    """The shapes of `spec`'s checkpoints that have a `kind` preset: "title: key value, ..." each."""
    return [f"{m.title}: {m.shape_text()}" for m in spec.checkpoints if kind in m.presets]


def resolve(cache: CacheConfig, *, spec: ModelSpec, model: ModelConfig, sampling: SamplingConfig,
            read: Callable[[str], dict], prefix: str = "cache") -> tuple[CacheConfig, str | None]:
    """`cache` with its published preset named when it gives neither a preset nor its own numbers,
    and the one-line note saying what was detected from what (None when nothing was resolved).
    A folder that matches no published model keeps the kind's error, with the shapes looked for
    appended (UserError). `read(name)`: a config file of the folder as a dict ({} if absent)."""
    if cache.kind == registry.NONE or registry.get(cache.kind).presets is None or model.path is None:
        return cache, None  # a kind without presets, or a tiny preset's error (check_cache), stays as it is
    try:
        cache.check_complete()
        return cache, None
    except ValueError as err:
        missing = err
    kind = registry.get(cache.kind)
    title, presets = kind.title, kind.presets
    files = [f"{expert}/config.json" for expert in spec.experts]
    found = detect(cache.kind, spec=spec, configs=[read(name) for name in files], sampling=sampling)
    if found is None:
        shapes = looked_for(cache.kind, spec)
        if not shapes:
            raise UserError(f"{prefix}.{missing}; {title} has no published preset for {spec.title}")
        raise UserError(f"{prefix}.{missing}; no published model matched {model.path}/{files[0]} "
                        f"(looked for {'; '.join(shapes)})")
    assert found.preset in presets, found.preset
    why = f"; {found.pick.why}" if found.pick.why else ""
    note = (f"{prefix}.preset={found.preset} ({title}), detected: {' and '.join(files)} "
            f"{'have' if len(files) > 1 else 'has'} the shape of {found.model.title} "
            f"({found.model.shape_text()}){why}")
    return dataclasses.replace(cache, preset=found.preset), note
