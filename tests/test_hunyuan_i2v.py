"""HunyuanVideo image-to-video: unison's latents against diffusers' HunyuanVideoImageToVideoPipeline
on the tiny models for both image_condition_types (latent_concat: the make-tiny preset;
token_replace: the same preset with a token_replace transformer), the tiny prompt template,
N ranks against one in every parallel mode, and the bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from test_i2v import _picture
from unison.engine.plan import plan_run
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine
from unison.engine.errors import UserError

CONDITIONS = ("latent_concat", "token_replace")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    return _picture(folder / "first.png", 1), _picture(folder / "other.png", 2)


@pytest.fixture(scope="module")
def folders(tiny_folder, tmp_path_factory) -> dict[str, str]:
    """{condition type: tiny folder}: make-tiny's (latent_concat) and a token_replace one."""
    from unison.engine.models.hunyuan_video.i2v import tiny_pipeline

    token_replace = tmp_path_factory.mktemp("tiny-hunyuanvideo-i2v-token-replace")
    tiny_pipeline(0, condition="token_replace").save_pretrained(token_replace)
    return {"latent_concat": tiny_folder("hunyuanvideo-i2v"), "token_replace": str(token_replace)}


def _sampling(image: str, *, height=64, width=48, steps=3, **extra) -> SamplingConfig:
    """Embedded guidance 4 and true CFG 2 with a negative prompt: two branches."""
    return SamplingConfig(prompt="a dog runs on the beach", negative_prompt="blurred", seed=3, guidance=4.0,
                          true_cfg_scale=2.0, height=height, width=width, frames=9, steps=steps, image=image,
                          max_sequence_length=16, **extra)


def _render(folder: str, sampling: SamplingConfig, parallel: ParallelConfig | None = None) -> torch.Tensor:
    config = RunConfig(model=ModelConfig(path=folder), sampling=sampling, parallel=parallel or ParallelConfig(),
                       output=OutputConfig(decode=False, progress=False))
    return Engine.from_config(config).render().latents


def test_the_tiny_template_tokenizes_as_the_pipeline_expects(folders):
    """The tiny LLaVA tokenizer puts the image placeholder where diffusers' template says
    (image_emb_start) and the prompt right after crop_start tokens; the vision tower gives
    image_emb_len tokens; the folder is detected as hunyuanvideo-i2v, whatever its condition type."""
    from diffusers import HunyuanVideoImageToVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    from unison.engine.models import detect_family, read_model_index

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(folders["latent_concat"], dtype=torch.float32)
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    ids = pipe.tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].format("a dog")).input_ids
    assert ids.index(pipe.text_encoder.config.image_token_index) == DEFAULT_PROMPT_TEMPLATE["image_emb_start"]
    assert len(pipe.tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    pixels = pipe.image_processor(Image.new("RGB", (80, 56)), return_tensors="pt").pixel_values
    features = pipe.text_encoder.get_image_features(pixel_values=pixels)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    tokens = sum(f.shape[-2] for f in features) if isinstance(features, (list, tuple)) else features.shape[-2]
    assert tokens == DEFAULT_PROMPT_TEMPLATE["image_emb_len"]
    for condition, folder in folders.items():
        assert detect_family(read_model_index(folder)) == "hunyuanvideo-i2v", condition


@pytest.mark.parametrize("condition", CONDITIONS)
def test_latents_match_diffusers(folders, pictures, condition):
    from diffusers import HunyuanVideoImageToVideoPipeline

    sampling = _sampling(pictures[0])
    ours = _render(folders[condition], sampling)
    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(folders[condition], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=Image.open(pictures[0]).convert("RGB"), prompt=sampling.prompt,
                  negative_prompt=sampling.negative_prompt, height=64, width=48, num_frames=9, num_inference_steps=3,
                  guidance_scale=4.0, true_cfg_scale=2.0, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(3), output_type="latent", return_dict=False)[0]
    assert ours.shape == theirs.shape == (1, 4, 2 if condition == "latent_concat" else 3, 8, 6)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5


@pytest.mark.parametrize("condition", CONDITIONS)
def test_decoded_frames_match_diffusers(folders, pictures, condition):
    """The video, not only the latents: latent_concat decodes from every latent frame (the
    picture's first, which the causal VAE then sees) and drops the picture's 4 pixel frames, as
    diffusers does; decoding the result latents alone would give other first frames."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    from unison.engine.io.video import to_uint8_frames

    sampling = _sampling(pictures[0])
    engine = Engine.from_config(RunConfig(model=ModelConfig(path=folders[condition]), sampling=sampling,
                                          output=OutputConfig(decode=False, progress=False)))
    result = engine.render()
    latents, drop = result.loop.decode if result.loop.decode is not None else (result.latents, 0)
    ours = engine.decode(latents, drop=drop)
    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(folders[condition], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=Image.open(pictures[0]).convert("RGB"), prompt=sampling.prompt,
                  negative_prompt=sampling.negative_prompt, height=64, width=48, num_frames=9, num_inference_steps=3,
                  guidance_scale=4.0, true_cfg_scale=2.0, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(3), output_type="np", return_dict=False)[0][0]
    theirs = to_uint8_frames(theirs)
    assert ours.shape == theirs.shape == (5 if condition == "latent_concat" else 9, 64, 48, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    if condition == "latent_concat":  # not vacuous: the result latents alone decode to other frames
        trimmed = engine.decode(result.latents)
        assert np.abs(trimmed.astype(int) - theirs.astype(int)).max() > 1


@pytest.mark.parametrize("condition", CONDITIONS)
def test_the_picture_changes_the_video(folders, pictures, condition):
    """The parity above is not vacuous: another picture changes the latents far above 1e-5, in
    the text (LLaVA) and in the latents; token_replace keeps the picture's encoded latent frame
    as the first one (a VAE encode done here)."""
    base = _render(folders[condition], _sampling(pictures[0]))
    other = _render(folders[condition], _sampling(pictures[1]))
    assert ((base - other).norm() / base.norm()).item() > 1e-3
    if condition == "token_replace":
        from diffusers import AutoencoderKLHunyuanVideo
        from diffusers.video_processor import VideoProcessor

        vae = AutoencoderKLHunyuanVideo.from_pretrained(folders[condition], subfolder="vae")
        pixels = VideoProcessor(vae_scale_factor=8).preprocess(Image.open(pictures[0]).convert("RGB"), 64, 48)
        with torch.no_grad():
            encoded = vae.encode(pixels.unsqueeze(2)).latent_dist.mode() * vae.config.scaling_factor
        torch.testing.assert_close(base[:, :, :1], encoded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling, message", [
    (dict(model="hunyuanvideo-i2v"), "sampling.image: hunyuanvideo-i2v is an image-to-video model: give the first "
                                     "frame (--image PATH)"),
    (dict(model="hunyuanvideo-i2v", image="first", last_image="last"), "sampling.last_image: hunyuanvideo-i2v takes "
                                                                       "a first frame only"),
    (dict(model="hunyuanvideo", image="first"), "sampling.image: hunyuanvideo is a text-to-video model; "
                                                "image-to-video needs wan2.2-ti2v"),
    (dict(model="hunyuanvideo", image="first"), "hunyuanvideo-i2v (HunyuanVideo I2V (latent_concat, token_replace))"),
    (dict(model="hunyuanvideo-i2v", image="first", true_cfg_scale=2.0), "sampling.true_cfg_scale=2.0 needs a "
                                                                        "negative prompt"),
])
def test_bad_input_is_one_line_before_anything_loads(pictures, sampling, message):
    """plan_run reads configs only (no weights): the error comes before anything loads."""
    from unison.engine.config import config_from_dict

    files = {"first": pictures[0], "last": pictures[1]}
    family = sampling.pop("model")
    values = {k: files.get(v, v) if k in ("image", "last_image") else v for k, v in sampling.items()}
    with pytest.raises(UserError) as err:
        plan_run(config_from_dict({"model": {"family": family}, "sampling": values}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_every_cache_kind_runs_image_to_video(folders, pictures):
    """One rank, both condition types, every registered kind: its never-skipping setting renders
    exactly what no cache renders, and the battery's mixed HunyuanVideo setting skips some
    forwards and computes others. TeaCache has no indicator for token_replace blocks: a one-line
    error at plan time."""
    from test_cache_battery import SETTINGS
    from unison.caching import registry

    for condition, folder in folders.items():
        engine = Engine.from_config(RunConfig(model=ModelConfig(path=folder), sampling=_sampling(pictures[0], steps=6),
                                              output=OutputConfig(decode=False, progress=False)))
        plain = engine.render().latents
        for kind in registry.KINDS:
            if kind == "teacache" and condition == "token_replace":  # refused before anything loads
                with pytest.raises(UserError, match="cache: TeaCache has no indicator for hunyuanvideo-i2v's "
                                                    "token_replace blocks"):
                    plan_run(dataclasses.replace(engine.plan.config, cache=SETTINGS[kind].never))
                continue
            never = engine.render(dataclasses.replace(engine.plan.config, cache=SETTINGS[kind].never))
            assert torch.equal(never.latents, plain), (condition, kind)
            mixed = engine.render(dataclasses.replace(engine.plan.config, cache=SETTINGS[kind].mixed["hunyuanvideo"]))
            flags = {d[-1] for expert in mixed.cache_decisions.values() for d in expert}
            assert flags == {True, False}, (condition, kind, mixed.cache_lines)
            assert torch.isfinite(mixed.latents).all() and not torch.equal(mixed.latents, plain), (condition, kind)


# ---------------------------------------------------------------------------------------------
# N ranks against one rank, both condition types, one pool call per world size. 48 x 48 pixels:
# 3 latent frames of 3 x 3 tokens, 27 video tokens (neither 2 nor 4 divides them); the first
# frame's 9 tokens fall on rank 0 alone (2 ranks, 14 tokens each) or on ranks 0 and 1 (4 ranks,
# 7 each). Patch modes warm up over every step (synchronous K/V: exact). On 2 ranks, First-Block
# Cache under Ulysses on token_replace: the same decisions as one rank.

LAYOUTS = {2: [dict(ulysses=2), dict(ring=2), dict(cfg=2), dict(patch=2, patch_warmup_steps=3),
               dict(patch=2, patch_mode="pipefusion", patch_warmup_steps=3)],
           4: [dict(ulysses=2, ring=2), dict(cfg=2, ulysses=2)]}
UNEVEN = dict(height=48, width=48)
CACHED = CacheConfig(kind="fbcache", threshold=0.2, verify=True)
"""On tiny token_replace (48 x 48, 6 steps) it skips some steps and computes others."""


def _config(folder: str, pictures, parallel: ParallelConfig, cache: CacheConfig | None = None) -> RunConfig:
    sampling = _sampling(pictures[0], **UNEVEN, **({"steps": 6} if cache else {}))
    return RunConfig(model=ModelConfig(path=folder), sampling=sampling, parallel=parallel,
                     cache=cache or CacheConfig(), output=OutputConfig(decode=False, progress=False))


def _runs(world: int, folders, pictures) -> list[tuple[str, dict, RunConfig]]:
    runs = [(condition, layout, _config(folders[condition], pictures, ParallelConfig(**layout, timeout_s=60)))
            for condition in CONDITIONS for layout in LAYOUTS[world]]
    if world == 2:
        runs.append(("token_replace", {"ulysses": 2, "cache": "fbcache"},
                     _config(folders["token_replace"], pictures, ParallelConfig(ulysses=2, timeout_s=60), CACHED)))
    return runs


@pytest.fixture(scope="module")
def one_rank(folders, pictures):
    out = {condition: Engine.from_config(_config(folders[condition], pictures, ParallelConfig())).render()
           for condition in CONDITIONS}
    cached = Engine.from_config(_config(folders["token_replace"], pictures, ParallelConfig(), CACHED)).render()
    assert {d[-1] for d in cached.cache_decisions["transformer"]} == {True, False}
    out["token_replace", "fbcache"] = cached
    return out


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_n_ranks_equal_one_rank(world, folders, pictures, one_rank):
    from multirank import render_each, run_ranks

    runs = _runs(world, folders, pictures)
    per_rank = run_ranks(world, render_each, [config for *_, config in runs])
    for rank, results in enumerate(per_rank):
        for (condition, layout, _), (latents, decisions) in zip(runs, results, strict=True):
            one = one_rank[condition, "fbcache"] if layout.get("cache") else one_rank[condition]
            err = ((latents - one.latents).norm() / one.latents.norm()).item()
            assert err <= 1e-5, (condition, layout, rank, err)
            if layout.get("cache"):
                assert decisions == one.cache_decisions, (condition, layout, rank)
