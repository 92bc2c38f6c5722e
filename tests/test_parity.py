"""Invariant 1: on one device with no cache, unison's final latents equal diffusers' own pipeline."""

from __future__ import annotations

import pytest
import torch

import families
from unison.engine.config import ModelConfig, OutputConfig, RunConfig, SamplingConfig
from unison.engine.models import SPECS
from unison.engine.render import Engine

PROMPT = "A cat walks on the grass, realistic"
NEGATIVE = "worst quality, blurred"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unison_latents(folder: str, **sampling) -> torch.Tensor:
    config = RunConfig(model=ModelConfig(path=folder), sampling=SamplingConfig(**sampling),
                       output=OutputConfig(decode=False, progress=False))
    return Engine.from_config(config).render().latents


def diffusers_latents(cls, folder: str, seed: int, **kwargs) -> torch.Tensor:
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(generator=generator, output_type="latent", return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_family_matches_diffusers(tiny_folder, tmp_path, family):
    """The registry's battery: every family (a new one with no edit here) renders the latents its
    diffusers pipeline gives with the same folder, prompt, seed and settings (two guidance branches,
    a picture where it needs one; tests/families.py reads what differs from the spec)."""
    folder = tiny_folder(family)
    sampling = families.sampling(family, steps=3, folder=tmp_path)
    config = RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                       output=OutputConfig(decode=False, progress=False))
    ours = Engine.from_config(config).render().latents
    theirs = families.run(families.pipeline(family, folder), family, sampling)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= 1e-5


# (family, unison sampling, extra diffusers kwargs that name the same thing differently)
WAN_CASES = [
    pytest.param("wan", dict(guidance=5.0), {}, id="wan2.1-cfg"),
    pytest.param("wan", dict(guidance=1.0), {}, id="wan2.1-no-cfg"),
    pytest.param("wan2.2", dict(guidance=4.0, guidance_2=2.5), {}, id="wan2.2-two-experts"),
    pytest.param("wan2.2-ti2v", dict(guidance=5.0), {}, id="wan2.2-ti2v-expand-timesteps"),
]


@pytest.mark.parametrize("family, sampling, _", WAN_CASES)
def test_wan_matches_diffusers(tiny_folder, family, sampling, _):
    from diffusers import WanPipeline

    folder = tiny_folder(family)
    common = dict(height=64, width=64, frames=9, steps=6, seed=3, max_sequence_length=24)
    ours = unison_latents(folder, prompt=PROMPT, negative_prompt=NEGATIVE, **common, **sampling)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=9,
                  num_inference_steps=6, guidance_scale=sampling["guidance"], max_sequence_length=24)
    if "guidance_2" in sampling:
        kwargs["guidance_scale_2"] = sampling["guidance_2"]
    theirs = diffusers_latents(WanPipeline, folder, 3, **kwargs)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= 1e-5


def test_wan22_switches_experts(tiny_folder):
    """The two-expert run really uses both experts (else parity above would not cover the switch)."""
    config = RunConfig(model=ModelConfig(path=tiny_folder("wan2.2")),
                       sampling=SamplingConfig(height=64, width=64, frames=9, steps=6, guidance=4.0,
                                               max_sequence_length=24),
                       output=OutputConfig(decode=False, progress=False))
    steps = Engine.from_config(config).render().loop.steps
    experts = [s.expert for s in steps]
    assert experts[0] == "transformer" and experts[-1] == "transformer_2"
    assert all(s.timestep >= 875 for s in steps if s.expert == "transformer")
    assert all(s.timestep < 875 for s in steps if s.expert == "transformer_2")


@pytest.mark.parametrize("true_cfg, negative", [(1.0, None), (3.0, NEGATIVE)], ids=["embedded", "true-cfg"])
def test_hunyuanvideo_matches_diffusers(tiny_folder, true_cfg, negative):
    from diffusers import HunyuanVideoPipeline

    folder = tiny_folder("hunyuanvideo")
    ours = unison_latents(folder, prompt=PROMPT, negative_prompt=negative, height=64, width=64, frames=9,
                          steps=5, guidance=6.0, true_cfg_scale=true_cfg, seed=4, max_sequence_length=24)
    theirs = diffusers_latents(HunyuanVideoPipeline, folder, 4, prompt=PROMPT, negative_prompt=negative,
                               height=64, width=64, num_frames=9, num_inference_steps=5, guidance_scale=6.0,
                               true_cfg_scale=true_cfg, max_sequence_length=24)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= 1e-5


def test_prompts_change_the_result(tiny_folder):
    """The offline tokenizer distinguishes prompts, so parity is not trivially about one embedding."""
    folder = tiny_folder("wan")
    a = unison_latents(folder, prompt="a dog on the beach", height=64, width=64, frames=5, steps=2,
                       max_sequence_length=24)
    b = unison_latents(folder, prompt="a city street at night", height=64, width=64, frames=5, steps=2,
                       max_sequence_length=24)
    assert rel_err(a, b) > 1e-3
