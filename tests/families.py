"""One place that knows how to run each family's tiny model through diffusers' own pipeline with
the settings unison renders: for the parity battery (tests/test_parity.py, every family of the
registry) and the cache parity tests (First-Block Cache, MagCache, TaylorSeer), which compare
decisions and latents family by family. What differs between families is read from their specs
(the pipeline class, guidance, whether a picture is needed), so a new family needs no edit here."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unison.engine.config import SamplingConfig
from unison.engine.models import get_spec


def picture(folder: Path) -> str:
    """A smooth random 96 x 30 picture (not the video's aspect; where the pipeline sizes the video
    from the picture, this one gives a small video), saved once per folder."""
    path = Path(folder) / "picture.png"
    if not path.exists():
        low = np.random.default_rng(7).uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
        Image.fromarray(np.array(Image.fromarray(low).resize((96, 30), Image.BILINEAR))).save(path)
    return str(path)


def sizes_the_video(family: str) -> bool:
    """Whether the family's diffusers pipeline takes no height and width (it sizes the video from
    the picture; the engine then does the same)."""
    import diffusers

    return "height" not in inspect.signature(getattr(diffusers, get_spec(family).pipeline_class).__call__).parameters


def sampling(family: str, *, steps: int, folder: Path | None = None, **overrides) -> SamplingConfig:
    """Two guidance branches (true CFG where guidance is embedded), a size the family takes, a
    picture where it needs one (written in `folder`), and a short text unless its tiny preset
    needs a longer one (Wan 2.1 I2V its trained 512; a chat template's system prompt)."""
    spec = get_spec(family)
    embedded = spec.embedded_guidance
    text = spec.tiny_defaults.max_sequence_length
    values = dict(prompt="a dog runs on the beach", negative_prompt="blurred", guidance=4.0, seed=1, frames=9,
                  steps=steps, height=max(48, 2 * spec.size_multiple), width=48 if embedded else 64,
                  true_cfg_scale=3.0 if embedded else None,
                  max_sequence_length=128 if embedded else text if text >= 128 else 16,
                  image=picture(folder) if spec.needs_image else None)
    if sizes_the_video(family):
        values.update(height=None, width=None)
    return SamplingConfig(**{**values, **overrides})


def pipeline(family: str, folder: str, *, dtype: torch.dtype = torch.float32):
    """diffusers' pipeline for the family's tiny folder, quiet."""
    import diffusers

    pipe = getattr(diffusers, get_spec(family).pipeline_class).from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, family: str, s: SamplingConfig) -> torch.Tensor:
    """diffusers' final latents for the sampling `s` (the same seed, on a CPU generator)."""
    kwargs = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                  num_frames=s.frames, num_inference_steps=s.steps, max_sequence_length=s.max_sequence_length,
                  guidance_scale=s.guidance)
    if get_spec(family).embedded_guidance:
        kwargs["true_cfg_scale"] = s.true_cfg_scale
    if s.guidance_2 is not None:
        kwargs["guidance_scale_2"] = s.guidance_2
    if s.image is not None:
        kwargs["image"] = Image.open(s.image).convert("RGB")
    # A pipeline that guides through a guider component (HunyuanVideo 1.5) takes its scale there,
    # and its text length as an attribute.
    accepted = inspect.signature(pipe.__call__).parameters
    if "guidance_scale" not in accepted and getattr(pipe, "guider", None) is not None:
        pipe.guider = pipe.guider.new(guidance_scale=s.guidance)
    if "max_sequence_length" not in accepted and hasattr(pipe, "tokenizer_max_length"):
        pipe.tokenizer_max_length = s.max_sequence_length
    if get_spec(family).forcing:
        # Diffusion forcing: the window settings by diffusers' names; its addnoise_condition draws
        # from torch's global generator, which unison's seeds alike (engine/windows.py).
        kwargs.update(base_num_frames=s.window_frames or 97, overlap_history=s.overlap_frames,
                      addnoise_condition=s.addnoise_condition, ar_step=s.ar_step,
                      causal_block_size=s.causal_block_size, fps=s.fps or 24)
        torch.manual_seed(s.seed)
    kwargs = {key: value for key, value in kwargs.items() if key in accepted}
    return pipe(generator=torch.Generator().manual_seed(s.seed), output_type="latent", return_dict=False,
                **kwargs)[0]
