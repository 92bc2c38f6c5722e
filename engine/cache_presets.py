"""Which published cache preset fits a model folder: MagCache's ratios and TeaCache's coefficients
were calibrated by their authors on particular checkpoints, so a run that names neither a preset
nor its own numbers gets the preset of the checkpoint the folder holds, told from its family and
its transformer's config.json (no weights), and says so.

A folder is a published model when every expert's transformer/config.json has that model's
shape (the values below; a key the file lacks reads as null, diffusers' default for the keys
that are null here). Checkpoints of one shape that were calibrated apart (Wan 2.1 I2V 14B 480P
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
from unison.engine.errors import UserError



@dataclass(frozen=True)
class Pick:
    """One preset of a published model, for the videos it applies to."""

    preset: str
    shorter_side_at_most: int | None = None
    """The video's shorter side is at most this many pixels (None: any size)."""
    image: bool | None = None
    """The run gives sampling.image (True), gives none (False), either (None)."""
    why: str = ""
    """What told this preset apart from the model's others (empty when it has one)."""

    def fits(self, sampling: SamplingConfig) -> bool:
        side = min(sampling.height, sampling.width)
        return ((self.shorter_side_at_most is None or side <= self.shorter_side_at_most)
                and (self.image is None or self.image == (sampling.image is not None)))


@dataclass(frozen=True)
class PublishedModel:
    title: str
    """The checkpoint as its authors name it."""
    family: str
    """The unison family (engine/models) its diffusers folder is detected as."""
    shape: tuple[tuple[str, object], ...]
    """(key, value) pairs of every expert's transformer/config.json that tell it apart."""
    presets: dict[str, tuple[Pick, ...]]
    """Per cache kind (one whose registry entry has `presets`), its presets in order; the first
    that fits the run is taken."""

    def matches(self, configs: list[dict]) -> bool:
        return bool(configs) and all(config.get(key) == value for config in configs for key, value in self.shape)

    def shape_text(self) -> str:
        return ", ".join(f"{key} {'null' if value is None else value}" for key, value in self.shape)


def _wan(layers: int, heads: int, in_channels: int, ffn: int, **more: object) -> tuple[tuple[str, object], ...]:
    return (("num_layers", layers), ("num_attention_heads", heads), ("in_channels", in_channels),
            ("ffn_dim", ffn), *more.items())


def _by_side(side: int, low: str, high: str, label: str) -> tuple[Pick, Pick]:
    return (Pick(low, shorter_side_at_most=side, why=f"{label}: the video's shorter side is at most {side}"),
            Pick(high, why=f"not {label}: the video's shorter side is over {side}"))


# Shapes: diffusers' scripts/convert_wan_to_diffusers.py get_transformer_config (huggingface/diffusers
# @58eb52c0: Wan-T2V-1.3B L329-349, Wan-T2V-14B L350-370, Wan-I2V-14B-480p/720p L371-414 (identical
# shapes; FLF2V-14B, L415-438, adds pos_embed_seq_len 514, so null here keeps it out), Wan2.2-I2V-14B
# L508-528, Wan2.2-T2V-A14B L529-549 (both experts, L1173), Wan2.2-TI2V-5B L550-570) and
# scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS["HYVideo-T/2-cfgdistill"]
# (L146-164: the I2V checkpoints differ in image_condition_type, and the 33-channel one in in_channels).
# Presets: caching/magcache_presets.py (MagCache's own tables, as named there) and caching/teacache.py.
PUBLISHED: tuple[PublishedModel, ...] = (
    PublishedModel("Wan 2.1 T2V 1.3B", "wan", _wan(30, 12, 16, 8960),
                   {"magcache": (Pick("wan2.1-t2v-1.3b"),), "teacache": (Pick("wan2.1-t2v-1.3b"),)}),
    PublishedModel("Wan 2.1 T2V 14B", "wan", _wan(40, 40, 16, 13824),
                   {"magcache": (Pick("wan2.1-t2v-14b"),), "teacache": (Pick("wan2.1-t2v-14b"),)}),
    PublishedModel("Wan 2.1 I2V 14B", "wan-i2v", _wan(40, 40, 36, 13824, image_dim=1280, pos_embed_seq_len=None),
                   {"magcache": _by_side(480, "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "480p"),
                    "teacache": _by_side(480, "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "480p")}),
    PublishedModel("Wan 2.2 T2V A14B", "wan2.2", _wan(40, 40, 16, 13824),
                   {"magcache": (Pick("wan2.2-t2v-a14b"),)}),
    PublishedModel("Wan 2.2 I2V A14B", "wan2.2-i2v", _wan(40, 40, 36, 13824, image_dim=None),
                   {"magcache": (Pick("wan2.2-i2v-a14b"),)}),
    PublishedModel("Wan 2.2 TI2V 5B", "wan2.2-ti2v", _wan(30, 24, 48, 14336),
                   {"magcache": (Pick("wan2.2-ti2v-5b", image=False, why="text to video: no sampling.image"),
                                 Pick("wan2.2-ti2v-5b-i2v", image=True, why="image to video: sampling.image given"))}),
    PublishedModel("HunyuanVideo T2V", "hunyuanvideo",
                   (("num_layers", 20), ("num_single_layers", 40), ("num_attention_heads", 24),
                    ("attention_head_dim", 128), ("in_channels", 16), ("image_condition_type", None)),
                   {"magcache": _by_side(544, "hunyuanvideo-544p", "hunyuanvideo-720p", "544p"),
                    "teacache": (Pick("hunyuanvideo"),)}),
)
"""The checkpoints the presets were published for (each kind's presets exist: a test checks)."""


@dataclass(frozen=True)
class Detected:
    preset: str
    """The preset's name (in the kind's PRESETS)."""
    model: PublishedModel
    """The checkpoint the folder's shape is."""
    pick: Pick
    """Which of its presets the run's video took."""


def detect(kind: str, *, family: str, configs: list[dict], sampling: SamplingConfig) -> Detected | None:
    """The preset of `kind` for a `family` folder whose experts' config.json are `configs`, or None."""
    for model in PUBLISHED:
        if model.family == family and model.matches(configs):
            for pick in model.presets.get(kind, ()):
                if pick.fits(sampling):
                    return Detected(pick.preset, model, pick)
    return None


def looked_for(kind: str, family: str) -> list[str]:
    """The shapes of `family` that have a `kind` preset: "title: key value, ..." each."""
    return [f"{m.title}: {m.shape_text()}" for m in PUBLISHED if m.family == family and kind in m.presets]


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
    found = detect(cache.kind, family=spec.family, configs=[read(name) for name in files], sampling=sampling)
    if found is None:
        shapes = looked_for(cache.kind, spec.family)
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
