"""Conditioning images (image-to-video): checked before anything loads, read and resized for the
VAE the way diffusers' pipelines do it.

`sampling.image` (and `sampling.last_image`, the last frame of first-last-frame models) is a
path; a batch job's relative path is resolved against its JSONL file's folder (launch/jobs.py).
`sampling.image_resize` says how the picture meets the video's height x width:
- auto (the default): what the family's diffusers pipeline does, stretch or crop (the family's
  SamplingDefaults.image_resize);
- stretch (what diffusers' Wan and HunyuanVideo image-to-video pipelines do: their
  VideoProcessor resizes to exactly height x width, whatever the aspect ratio);
- crop: scale to cover height x width, keeping the aspect ratio, and cut the centre (HunyuanVideo
  1.5's image-to-video pipeline);
- pad: scale to fit inside, keeping the aspect ratio, and fill the rest (diffusers' "fill").
The image encoders of Wan 2.1 I2V (CLIP) and HunyuanVideo I2V (LLaVA) get the picture as it is,
through their own processor (resize and centre crop to its input size), as in diffusers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from unison.engine.errors import UserError

RESIZE_MODES = {"stretch": "default", "crop": "crop", "pad": "fill"}
"""sampling.image_resize -> diffusers' VaeImageProcessor resize_mode."""


def check_images(sampling, *, family: str, takes_image: bool, needs_image: bool, takes_last: bool) -> None:
    """One-line UserError, before anything loads, for images the family cannot take or lacks, and
    for files that are missing or not pictures."""
    image, last = sampling.image, sampling.last_image
    if image is not None and not takes_image:
        raise UserError(f"sampling.image: {family} is a text-to-video model; image-to-video needs "
                        f"{_families_that('takes_image')}")
    if last is not None and image is None:
        raise UserError("sampling.last_image needs sampling.image (the first frame) too")
    if image is None and needs_image:
        raise UserError(f"sampling.image: {family} is an image-to-video model: give the first frame (--image PATH)")
    if last is not None and not takes_last:
        raise UserError(f"sampling.last_image: {family} takes a first frame only (first-last-frame: "
                        f"{_families_that('takes_last')})")
    if sampling.image_resize not in RESIZE_MODES:
        raise UserError(f"sampling.image_resize must be one of {', '.join(RESIZE_MODES)}, got {sampling.image_resize!r}")
    for name, path in (("image", image), ("last_image", last)):
        if path is not None:
            picture = read(path, f"sampling.{name}")
            check_resize(picture.size, height=sampling.height, width=sampling.width, mode=sampling.image_resize,
                         what=f"sampling.{name}", path=path)


def _families_that(what: str) -> str:
    """The families whose hooks say `what` (takes_image, takes_last), named with their titles."""
    from unison.engine.models import SPECS

    names = [f"{family} ({spec.title})" for family, spec in SPECS.items() if getattr(spec.hooks, what)]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


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
    for name in ("image", "last_image", "extend"):
        path, recorded = getattr(sampling, name), getattr(sampling, f"{name}_sha256")
        if path is None:
            if recorded is not None:
                raise UserError(f"sampling.{name}_sha256 is set but sampling.{name} is not")
            continue
        actual = sha256(path)
        if recorded is not None and recorded != actual:
            raise UserError(f"sampling.{name}: {path} changed since this config was written (sha256 {actual[:12]}…, "
                            f"recorded {recorded[:12]}…); remove sampling.{name}_sha256 to render the new file")
        found[f"{name}_sha256"] = actual
    return dataclasses.replace(sampling, **found) if found else sampling


MAX_SIDE = 16384
MAX_PIXELS = 40_000_000
"""The largest picture read (an 8K frame is 33 MP): a conditioning frame is resized to the video's
few hundred thousand pixels anyway, and a larger one only costs memory before it is (or a
decompression bomb's header claims it)."""


def read(path: str, what: str = "sampling.image"):
    """The picture at `path` as an RGB PIL image, as diffusers' `load_image` sees it (EXIF
    orientation applied) with every mode converted by its meaning: 16- and 32-bit grayscale scaled
    to 8 bits (not clipped), transparency composited over white, palette, CMYK and the rest
    through PIL's own conversion. UserError naming `what` for a file that is missing, not a
    picture, or larger than MAX_SIDE / MAX_PIXELS (checked from the header, before decoding)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: no such file: {path}")
    try:
        with Image.open(file) as opened:
            width, height = opened.size
            if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                raise UserError(f"{what}: {path} is {width}x{height} pixels; at most {MAX_SIDE} on a side and "
                                f"{MAX_PIXELS // 1_000_000} megapixels (resize it first)")
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what}: {path} is not a readable image ({reason})") from None


def _to_rgb(image):
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        brightest = values.max(initial=0)
        # 16-bit files open as I;16 (or I holding 0..65535); F as PIL leaves it (0..1 or 0..255).
        if image.mode == "F":
            top = 1.0 if brightest <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or brightest > 255 else 255.0
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def check_resize(size: tuple[int, int], *, height: int, width: int, mode: str, what: str, path: str) -> None:
    """The sizes diffusers' VaeImageProcessor resizes a `size` picture to for `mode` (crop:
    cover then cut; pad: fit inside then fill) must be at least one pixel and bounded."""
    w, h = size
    if mode == "stretch":
        return
    ratio, picture = width / height, w / h
    wide = ratio > picture if mode == "crop" else ratio < picture  # diffusers' own comparisons
    scaled = (width, h * width // w) if wide else (w * height // h, height)
    if min(scaled) < 1 or scaled[0] * scaled[1] > MAX_PIXELS:
        raise UserError(f"{what}: {path} ({w}x{h}) cannot be resized to {width}x{height} with image_resize={mode} "
                        f"(it would be {scaled[0]}x{scaled[1]} before the {'cut' if mode == 'crop' else 'fill'}); "
                        f"use image_resize=stretch or a picture closer to the video's shape")


def for_vae(processor, image, *, height: int, width: int, mode: str):
    """(1, 3, height, width) float32 in [-1, 1]: `image` resized by `mode` (RESIZE_MODES)."""
    import torch

    return processor.preprocess(image, height=height, width=width, resize_mode=RESIZE_MODES[mode]).to(torch.float32)


def stand_in_picture(sampling, spec):
    """`sampling` with a gray 64 x 64 picture standing in for a model that needs one and has none:
    for planning what does not depend on the picture (`unison plan` counts the condition's encode
    by the video's size; a batch's engine is planned before its jobs bring their pictures). The
    file is removed when the process ends."""
    if not spec.needs_image or sampling.image is not None:
        return sampling
    import atexit
    import shutil
    import tempfile

    from PIL import Image

    folder = tempfile.mkdtemp(prefix="unison-stand-in-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "stand-in.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    return dataclasses.replace(sampling, image=str(path))
