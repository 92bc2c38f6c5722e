"""Conditioning images (image-to-video): checked before anything loads, read and resized for the
VAE the way diffusers' pipelines do it.

`sampling.image` (and `sampling.last_image`, the last frame of first-last-frame models) is a
path; a batch job's relative path is resolved against its JSONL file's folder (engine/jobs.py).
`sampling.image_resize` says how the picture meets the video's height x width:
- stretch (the default, what diffusers' Wan and HunyuanVideo image-to-video pipelines do: their
  VideoProcessor resizes to exactly height x width, whatever the aspect ratio);
- crop: scale to cover height x width, keeping the aspect ratio, and cut the centre;
- pad: scale to fit inside, keeping the aspect ratio, and fill the rest (diffusers' "fill").
The image encoders of Wan 2.1 I2V (CLIP) and HunyuanVideo I2V (LLaVA) get the picture as it is,
through their own processor (resize and centre crop to its input size), as in diffusers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from unison.errors import UserError

RESIZE_MODES = {"stretch": "default", "crop": "crop", "pad": "fill"}
"""sampling.image_resize -> diffusers' VaeImageProcessor resize_mode."""


def check_images(sampling, *, family: str, takes_image: bool, needs_image: bool, takes_last: bool) -> None:
    """One-line UserError, before anything loads, for images the family cannot take or lacks, and
    for files that are missing or not pictures."""
    image, last = sampling.image, sampling.last_image
    if image is not None and not takes_image:
        raise UserError(f"sampling.image: {family} is a text-to-video model; image-to-video needs wan-i2v (Wan 2.1 "
                        "I2V), wan2.2-i2v (Wan 2.2 I2V A14B), wan2.2-ti2v (TI2V-5B) or hunyuanvideo-i2v "
                        "(HunyuanVideo I2V)")
    if last is not None and image is None:
        raise UserError("sampling.last_image needs sampling.image (the first frame) too")
    if image is None and needs_image:
        raise UserError(f"sampling.image: {family} is an image-to-video model: give the first frame (--image PATH)")
    if last is not None and not takes_last:
        raise UserError(f"sampling.last_image: {family} takes a first frame only (first-last-frame: wan-i2v with a "
                        "FLF2V checkpoint, or wan2.2-i2v)")
    if sampling.image_resize not in RESIZE_MODES:
        raise UserError(f"sampling.image_resize must be one of {', '.join(RESIZE_MODES)}, got {sampling.image_resize!r}")
    for name, path in (("image", image), ("last_image", last)):
        if path is not None:
            read(path, f"sampling.{name}")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_hashes(sampling):
    """`sampling` with each picture's SHA-256 recorded (after `check_images`); UserError if the
    config already recorded another one (the picture changed since the config was written)."""
    found = {}
    for name in ("image", "last_image"):
        path, recorded = getattr(sampling, name), getattr(sampling, f"{name}_sha256")
        if path is None:
            if recorded is not None:
                raise UserError(f"sampling.{name}_sha256 is set but sampling.{name} is not")
            continue
        actual = sha256(path)
        if recorded is not None and recorded != actual:
            raise UserError(f"sampling.{name}: {path} changed since this config was written (sha256 {actual[:12]}…, "
                            f"recorded {recorded[:12]}…); remove sampling.{name}_sha256 to render the new picture")
        found[f"{name}_sha256"] = actual
    return dataclasses.replace(sampling, **found) if found else sampling


def read(path: str, what: str = "sampling.image"):
    """The picture at `path` as an RGB PIL image; UserError naming `what` if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: no such file: {path}")
    try:
        with Image.open(file) as opened:
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{what}: {path} is not a readable image ({str(err).splitlines()[0]})") from None


def for_vae(processor, image, *, height: int, width: int, mode: str):
    """(1, 3, height, width) float32 in [-1, 1]: `image` resized by `mode` (RESIZE_MODES)."""
    import torch

    return processor.preprocess(image, height=height, width=width, resize_mode=RESIZE_MODES[mode]).to(torch.float32)
