"""One place that knows how to run each family's tiny model through diffusers' own pipeline with
the settings unison renders: for the cache parity tests (First-Block Cache, MagCache, TaylorSeer),
which compare decisions and latents family by family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unison.engine.config import SamplingConfig

I2V = ("wan-i2v", "wan2.2-i2v")
"""Families that need a picture."""


def picture(folder: Path) -> str:
    """A smooth random 80 x 56 picture (not the video's aspect), saved once per folder."""
    path = Path(folder) / "picture.png"
    if not path.exists():
        low = np.random.default_rng(7).uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
        Image.fromarray(np.array(Image.fromarray(low).resize((80, 56), Image.BILINEAR))).save(path)
    return str(path)


def sampling(family: str, *, steps: int, folder: Path | None = None, **overrides) -> SamplingConfig:
    """Two guidance branches, a size the family takes, a picture for image-to-video (written in
    `folder`), the text length Wan 2.1 I2V needs."""
    hunyuan = family == "hunyuanvideo"
    values = dict(prompt="a dog runs on the beach", negative_prompt="blurred", guidance=4.0, seed=1, frames=9,
                  steps=steps, height=64 if family == "wan2.2-ti2v" else 48, width=48 if hunyuan else 64,
                  true_cfg_scale=3.0 if hunyuan else None,
                  max_sequence_length=128 if hunyuan else 512 if family == "wan-i2v" else 16,
                  image=picture(folder) if family in I2V else None)
    return SamplingConfig(**{**values, **overrides})


def pipeline(family: str, folder: str, *, dtype: torch.dtype = torch.float32):
    """diffusers' pipeline for the family's tiny folder, quiet."""
    from diffusers import HunyuanVideoPipeline, WanImageToVideoPipeline, WanPipeline

    cls = HunyuanVideoPipeline if family == "hunyuanvideo" else WanImageToVideoPipeline if family in I2V \
        else WanPipeline
    pipe = cls.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, family: str, s: SamplingConfig) -> torch.Tensor:
    """diffusers' final latents for the sampling `s` (the same seed, on a CPU generator)."""
    kwargs = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                  num_frames=s.frames, num_inference_steps=s.steps, max_sequence_length=s.max_sequence_length,
                  guidance_scale=s.guidance)
    if family == "hunyuanvideo":
        kwargs["true_cfg_scale"] = s.true_cfg_scale
    if s.guidance_2 is not None:
        kwargs["guidance_scale_2"] = s.guidance_2
    if s.image is not None:
        kwargs["image"] = Image.open(s.image).convert("RGB")
    return pipe(generator=torch.Generator().manual_seed(s.seed), output_type="latent", return_dict=False,
                **kwargs)[0]
