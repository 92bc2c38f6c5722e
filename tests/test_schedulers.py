"""Selectable samplers: each allowed (family, scheduler) pair against diffusers' own pipeline given
the same scheduler, built in the test the way diffusers documents it; and the refusals."""

from __future__ import annotations

import pytest
import torch

from unison.engine.plan import plan_run
from unison.engine.config import ModelConfig, OutputConfig, RunConfig, SamplingConfig, config_from_dict
from unison.engine.render import Engine
from unison.engine.errors import UserError

FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)


def _theirs(name: str, config, shift: float):
    """The scheduler as a diffusers user builds it from the pipeline's config (not unison's code)."""
    import diffusers

    if name == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
    cls = {"unipc": diffusers.UniPCMultistepScheduler, "dpm++": diffusers.DPMSolverMultistepScheduler,
           "deis": diffusers.DEISMultistepScheduler}[name]
    extra = dict(algorithm_type="dpmsolver++") if name == "dpm++" else {}
    return cls.from_config(config, flow_shift=shift, **FLOW, **extra)


PAIRS = [("wan", name) for name in ("unipc", "dpm++", "deis", "euler")] + \
        [("hunyuanvideo", name) for name in ("unipc", "euler")]


@pytest.mark.parametrize("family, name", PAIRS, ids=[f"{f}-{n}" for f, n in PAIRS])
def test_each_scheduler_equals_diffusers_with_it(tiny_folder, family, name):
    from diffusers import HunyuanVideoPipeline, WanPipeline

    hunyuan = family == "hunyuanvideo"
    folder, shift = tiny_folder(family), 4.0
    sampling = SamplingConfig(prompt="a dog runs on the beach", negative_prompt="blurred", seed=2, height=48,
                              width=48 if hunyuan else 64, frames=9, steps=5, guidance=4.0,
                              true_cfg_scale=3.0 if hunyuan else None, max_sequence_length=128 if hunyuan else 16,
                              scheduler=name, flow_shift=shift)
    engine = Engine.from_config(RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                                          output=OutputConfig(decode=False, progress=False)))
    ours = engine.render().latents
    assert type(engine.pipe.scheduler).__name__ == type(_theirs(name, engine.pipe.scheduler.config, shift)).__name__
    pipe = (HunyuanVideoPipeline if hunyuan else WanPipeline).from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _theirs(name, pipe.scheduler.config, shift)
    theirs = pipe(prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=48, width=sampling.width,
                  num_frames=9, num_inference_steps=5, guidance_scale=4.0, max_sequence_length=sampling.max_sequence_length,
                  generator=torch.Generator().manual_seed(2), output_type="latent", return_dict=False,
                  **(dict(true_cfg_scale=3.0) if hunyuan else {}))[0]
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5


def test_schedulers_differ_and_the_engine_returns_to_the_folders():
    """Not vacuous: each sampler (and another shift) renders something else, and a later render
    with the default gets the folder's scheduler back, bitwise."""
    engine = Engine.from_config(RunConfig(model=ModelConfig(family="wan"), output=OutputConfig(decode=False,
                                                                                              progress=False),
                                          sampling=SamplingConfig(steps=4, height=48, width=64, frames=9)))
    plain = engine.render().latents
    seen = [plain]
    for name, shift in (("unipc", 5.0), ("dpm++", None), ("euler", None), ("deis", None)):
        config = engine.plan.config
        latents = engine.render(RunConfig(**{**config.__dict__, "sampling": SamplingConfig(
            **{**config.sampling.__dict__, "scheduler": name, "flow_shift": shift})})).latents
        assert all(((latents - other).norm() / other.norm()).item() > 1e-4 for other in seen), name
        seen.append(latents)
    assert torch.equal(engine.render().latents, plain)


@pytest.mark.parametrize("family, sampling, message", [
    ("hunyuanvideo", dict(scheduler="dpm++"), "sampling.scheduler: hunyuanvideo's pipeline passes sigmas, which "
                                              "dpm++ does not take; allowed: default, unipc, euler"),
    ("wan", dict(scheduler="ddim"), "sampling.scheduler: expected 'default' | 'unipc' | 'dpm++' | 'deis' | 'euler', "
                                    "got str 'ddim'"),
    ("wan", dict(flow_shift=0.0), "sampling.flow_shift must be positive, got 0.0"),
])
def test_bad_schedulers_are_one_line_before_loading(family, sampling, message):
    with pytest.raises(UserError) as err:
        plan_run(config_from_dict({"model": {"family": family}, "sampling": sampling}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_published_sigmas_equal_diffusers_given_them(tiny_folder):
    """lightx2v's 4-step schedule (sigmas 1, 0.75, 0.5, 0.25 at shift 5, Euler, no CFG): the
    timesteps are 1000 * 5s / (1 + 4s) (1000, 937.5, 833.3, 625, the distillation's own), and the
    latents equal diffusers' Wan pipeline whose Euler scheduler is handed the same sigmas (its
    pipeline takes none, so its set_timesteps is given them)."""
    import functools

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    folder, sigmas = tiny_folder("wan"), (1.0, 0.75, 0.5, 0.25)
    sampling = SamplingConfig(prompt="a dog runs on the beach", seed=2, height=48, width=64, frames=9, guidance=1.0,
                              max_sequence_length=16, scheduler="euler", flow_shift=5.0, sigmas=sigmas)
    engine = Engine.from_config(RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                                          output=OutputConfig(decode=False, progress=False)))
    assert engine.plan.config.sampling.steps == 4
    ours = engine.render().latents
    expected = [1000 * 5 * s / (1 + 4 * s) for s in sigmas]
    assert torch.allclose(engine.pipe.scheduler.timesteps, torch.tensor(expected), rtol=0, atol=1e-3)
    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=5.0)
    given = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None, **kw: given(sigmas=list(sigmas), device=device)
    theirs = pipe(prompt=sampling.prompt, height=48, width=64, num_frames=9, num_inference_steps=4,
                  guidance_scale=1.0, max_sequence_length=16, generator=torch.Generator().manual_seed(2),
                  output_type="latent", return_dict=False)[0]
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    plain = Engine.from_config(RunConfig(model=ModelConfig(path=folder), output=OutputConfig(decode=False, progress=False),
                                         sampling=SamplingConfig(**{**sampling.__dict__, "sigmas": None, "steps": 4})))
    assert not torch.allclose(plain.render().latents, ours)  # the schedule matters


@pytest.mark.parametrize("sigmas,extra,message", [
    ([1.0, 0.5], dict(steps=3), "sampling.sigmas lists 2 sigmas but sampling.steps is 3"),
    ([0.5, 0.75], {}, "sampling.sigmas must fall from at most 1 to above 0, one per step, got [0.5, 0.75]"),
    ([1.5, 0.5], {}, "sampling.sigmas must fall from at most 1 to above 0"),
    ([1.0, 0.0], {}, "sampling.sigmas must fall from at most 1 to above 0"),
    ([1.0, 0.5], dict(scheduler="dpm++"), "sampling.sigmas: the dpm++ sampler takes no sigmas; use unipc or euler"),
])
def test_bad_sigmas_are_one_line(sigmas, extra, message):
    config = config_from_dict({"model": {"family": "wan"}, "sampling": {"sigmas": sigmas, **extra}})
    with pytest.raises(UserError) as err:
        plan_run(config)
    assert message in str(err.value) and "\n" not in str(err.value)
