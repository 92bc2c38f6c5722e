"""Image-to-video: unison's latents against diffusers' WanImageToVideoPipeline on the tiny models
(Wan 2.1 I2V with CLIP tokens, Wan 2.2 I2V A14B with and without a last frame, TI2V-5B with a
picture), the resize modes, N ranks against one, and the images' bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from unison.engine.plan import plan_run
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine
from unison.engine.errors import UserError
from unison.launch.cli import main


def _picture(path, seed: int, size=(80, 56)) -> str:
    """A smooth random picture (not square, so resizing matters), saved as PNG."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(4, 5, 3))
    pixels = np.array(Image.fromarray(low.astype(np.uint8)).resize(size, Image.BILINEAR))
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    return _picture(folder / "first.png", 1), _picture(folder / "last.png", 2)


def _sampling(family: str, image: str, last: str | None = None, *, height=64, width=64, **extra) -> SamplingConfig:
    return SamplingConfig(prompt="a dog runs on the beach", negative_prompt="blurred", seed=3, guidance=4.0,
                          height=height, width=width, frames=9, steps=4, image=image,
                          max_sequence_length=512 if family == "wan-i2v" else 16,
                          last_image=last, **({"guidance_2": 3.0} if family == "wan2.2-i2v" else {}), **extra)


CASES = [pytest.param("wan-i2v", False, id="wan2.1-i2v-clip"),
         pytest.param("wan2.2-i2v", False, id="wan2.2-i2v"),
         pytest.param("wan2.2-i2v", True, id="wan2.2-i2v-first-last"),
         pytest.param("wan2.2-ti2v", False, id="wan2.2-ti2v-image")]


@pytest.mark.parametrize("family, with_last", CASES)
def test_latents_match_diffusers(tiny_folder, pictures, family, with_last):
    from diffusers import WanImageToVideoPipeline

    folder = tiny_folder(family)
    first, last = pictures
    sampling = _sampling(family, first, last if with_last else None)
    ours = Engine.from_config(RunConfig(model=ModelConfig(path=folder), sampling=sampling,
                                        output=OutputConfig(decode=False, progress=False))).render()
    pipe = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(guidance_scale_2=3.0) if family == "wan2.2-i2v" else {}
    theirs = pipe(image=Image.open(first).convert("RGB"),
                  last_image=Image.open(last).convert("RGB") if with_last else None,
                  prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=64, width=64,
                  num_frames=9, num_inference_steps=4, guidance_scale=4.0,
                  max_sequence_length=sampling.max_sequence_length, generator=torch.Generator().manual_seed(3),
                  output_type="latent", return_dict=False, **kwargs)[0]
    assert ours.latents.shape == theirs.shape
    assert ((ours.latents - theirs).norm() / theirs.norm()).item() <= 1e-5


@pytest.mark.parametrize("family", ["wan-i2v", "wan2.2-ti2v"])
def test_the_picture_and_the_resize_mode_change_the_video(tiny_folder, pictures, family):
    """The parity above is not vacuous: another picture, or cropping instead of stretching (80 x 56,
    the video 64 x 64), changes the latents; TI2V-5B keeps the picture's encoded latent frame as
    the first one (a VAE encode done here)."""
    first, last = pictures
    engine = Engine.from_config(RunConfig(model=ModelConfig(path=tiny_folder(family)),
                                          sampling=_sampling(family, first),
                                          output=OutputConfig(decode=False, progress=False)))
    base = engine.render().latents
    other = engine.render(dataclasses.replace(engine.plan.config, sampling=_sampling(family, last))).latents
    cropped = engine.render(dataclasses.replace(engine.plan.config,
                                                sampling=_sampling(family, first, image_resize="crop"))).latents
    # Far above the 1e-5 parity bound (the tiny random model damps the picture: ~1e-3 here).
    assert ((base - other).norm() / base.norm()).item() > 1e-4
    assert ((base - cropped).norm() / base.norm()).item() > 1e-4
    if family == "wan2.2-ti2v":
        from unison.engine.images import for_vae, read

        pipe = engine.pipe
        pixels = for_vae(pipe.video_processor, read(first), height=64, width=64, mode="stretch").unsqueeze(2)
        encoded = pipe.vae.encode(pixels).latent_dist.mode()
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(base[:, :, :1], (encoded - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling, message", [
    (dict(model="wan", image="first"), "sampling.image: wan is a text-to-video model; image-to-video needs wan2.2-ti2v"),
    (dict(model="hunyuanvideo", image="first"), "sampling.image: hunyuanvideo is a text-to-video model"),
    (dict(model="wan-i2v"), "sampling.image: wan-i2v is an image-to-video model: give the first frame (--image PATH)"),
    (dict(model="wan2.2-ti2v", image="first", last_image="last"), "sampling.last_image: wan2.2-ti2v takes a first "
                                                                   "frame only"),
    (dict(model="wan2.2-i2v", last_image="last"), "sampling.last_image needs sampling.image (the first frame) too"),
    (dict(model="wan-i2v", image="missing"), "sampling.image: no such file: "),
    (dict(model="wan-i2v", image="text"), " is not a readable image ("),
    (dict(model="wan-i2v", image="first", max_sequence_length=256), "sampling.max_sequence_length must be 512 for "
                                                                      "Wan 2.1 I2V"),
    (dict(model="wan2.2-i2v", image="first", image_resize="fit"), "sampling.image_resize: expected 'auto' | "
                                                                  "'stretch' | 'crop' | 'pad', got str 'fit'"),
])
def test_bad_images_are_one_line_before_anything_loads(pictures, tmp_path, sampling, message):
    from unison.engine.config import config_from_dict

    files = {"first": pictures[0], "last": pictures[1], "missing": str(tmp_path / "nope.png"),
             "text": str(tmp_path / "notes.png")}
    (tmp_path / "notes.png").write_text("not a picture")
    family = sampling.pop("model")
    values = {k: files.get(v, v) if k in ("image", "last_image") else v for k, v in sampling.items()}
    with pytest.raises(UserError) as err:
        plan_run(config_from_dict({"model": {"family": family}, "sampling": values}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# N ranks against one rank, every parallel mode, one pool call per world size. Patch modes warm
# up over every step (synchronous K/V: exact), at token counts no degree divides. Wan 2.1 I2V's context is 17 CLIP tokens + 512 text
# tokens (529: neither 2 nor 4 divides it; it is not split, every rank holds it whole).

LAYOUTS = {2: [dict(ulysses=2), dict(ring=2), dict(cfg=2), dict(patch=2, patch_warmup_steps=4),
               dict(patch=2, patch_mode="pipefusion", patch_warmup_steps=4)],
           4: [dict(ulysses=2, ring=2), dict(cfg=2, ulysses=2)]}
FAMILIES = [("wan-i2v", False), ("wan2.2-ti2v", False), ("wan2.2-i2v", True)]
CACHED = CacheConfig(kind="fbcache", threshold=0.05, verify=True)
"""On tiny Wan 2.1 I2V the first block's change is ~0.045 at step 1 (skips) and above 0.05 later."""


UNEVEN = {"wan-i2v": dict(height=48, width=48), "wan2.2-i2v": dict(height=48, width=48),
          "wan2.2-ti2v": dict(height=96, width=32)}
"""Video tokens no degree divides: 3 latent frames x 3 x 3 (Wan I2V), 3 x 3 x 1 (TI2V-5B, 16x VAE)."""


def _config(family: str, with_last: bool, pictures, parallel: ParallelConfig, cache=None) -> RunConfig:
    first, last = pictures
    sampling = _sampling(family, first, last if with_last else None, **UNEVEN[family])
    return RunConfig(model=ModelConfig(family=family), sampling=sampling,
                     parallel=parallel, cache=cache or CacheConfig(),
                     output=OutputConfig(decode=False, progress=False))


def _runs(world: int, pictures) -> list[tuple[str, dict, RunConfig]]:
    runs = [(family, layout, _config(family, last, pictures, ParallelConfig(**layout, timeout_s=60)))
            for family, last in FAMILIES for layout in LAYOUTS[world]]
    if world == 2:  # a data-dependent cache agreed over the ranks, image tokens in the context
        runs.append(("wan-i2v", {"ulysses": 2, "cache": "fbcache"},
                     _config("wan-i2v", False, pictures, ParallelConfig(ulysses=2, timeout_s=60), CACHED)))
    return runs


@pytest.fixture(scope="module")
def one_rank(pictures):
    out = {}
    for family, last in FAMILIES:
        out[family] = Engine.from_config(_config(family, last, pictures, ParallelConfig())).render()
    cached = Engine.from_config(_config("wan-i2v", False, pictures, ParallelConfig(), CACHED)).render()
    assert {d[-1] for d in cached.cache_decisions["transformer"]} == {True, False}
    out["wan-i2v", "fbcache"] = cached
    return out


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_n_ranks_equal_one_rank(world, pictures, one_rank):
    from multirank import render_each, run_ranks

    runs = _runs(world, pictures)
    per_rank = run_ranks(world, render_each, [config for *_, config in runs])
    for rank, results in enumerate(per_rank):
        for (family, layout, _), (latents, decisions) in zip(runs, results, strict=True):
            one = one_rank[family, "fbcache"] if layout.get("cache") else one_rank[family]
            err = ((latents - one.latents).norm() / one.latents.norm()).item()
            assert err <= 1e-5, (family, layout, rank, err)
            if layout.get("cache"):
                assert decisions == one.cache_decisions, (family, layout, rank)


def test_every_cache_kind_runs_image_to_video(pictures):
    """Tiny Wan 2.1 I2V, one rank, every registered kind: its never-skipping setting renders
    exactly what no cache renders, and the battery's mixed Wan setting skips some forwards
    (or attention calls) and computes others."""
    from test_cache_battery import SETTINGS
    from unison.caching import registry

    engine = Engine.from_config(_config("wan-i2v", False, pictures, ParallelConfig()))
    plain = engine.render().latents
    for kind in registry.KINDS:
        never = engine.render(dataclasses.replace(engine.plan.config, cache=SETTINGS[kind].never))
        assert torch.equal(never.latents, plain), kind
        mixed = engine.render(dataclasses.replace(engine.plan.config, cache=SETTINGS[kind].mixed["wan"]))
        flags = {d[-1] for expert in mixed.cache_decisions.values() for d in expert}
        assert flags == {True, False}, (kind, mixed.cache_lines)
        assert torch.isfinite(mixed.latents).all() and not torch.equal(mixed.latents, plain), kind


def test_batch_jobs_name_pictures_relative_to_their_file(tmp_path, pictures, capsys):
    """A jobs file beside its pictures: `image` resolves against the file's folder (not the working
    directory), the video renders with it (the resolved config beside it names the picture), and a
    job whose picture is missing is reported with its line number while the other renders."""
    import shutil

    from unison.launch.cli import main

    folder = tmp_path / "prompts"
    folder.mkdir()
    shutil.copy(pictures[0], folder / "cat.png")
    (folder / "jobs.jsonl").write_text('{"id": "cat", "prompt": "a cat", "image": "cat.png"}\n'
                                       '{"id": "dog", "prompt": "a dog", "image": "dog.png"}\n')
    out = tmp_path / "out"
    code = main(["batch", str(folder / "jobs.jsonl"), "--out", str(out), "--no-progress",
                 "--set", "model.family=wan2.2-ti2v", "--set", "sampling.steps=2", "--set", "sampling.height=64"])
    printed = capsys.readouterr()
    err = printed.err + printed.out
    assert "line 2" in err and "sampling.image: no such file: " + str(folder / "dog.png") in err, err[-800:]
    assert code == 0 and "1 bad lines skipped" in err  # a bad line never stops a batch
    assert (out / "cat.mp4").is_file() and not (out / "dog.mp4").exists()
    from unison.engine.config import load_yaml

    assert load_yaml(out / "cat.yaml").sampling.image == str(folder / "cat.png")


def test_the_resolved_config_records_the_pictures_hash_and_a_changed_picture_is_noticed(tmp_path, pictures):
    """The resolved config names each picture's SHA-256 (hashlib here, on the file's bytes); the
    same config refuses the picture once it changed; the checkpoint identity follows the picture."""
    import hashlib
    import shutil

    from unison.engine.io.checkpoint import fingerprint
    from unison.engine.config import config_from_dict, dump_yaml, load_yaml

    first = tmp_path / "first.png"
    shutil.copy(pictures[0], first)
    config = config_from_dict({"model": {"family": "wan2.2-i2v"},
                               "sampling": {"image": str(first), "last_image": pictures[1]}})
    resolved = plan_run(config).config
    assert resolved.sampling.image_sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert resolved.sampling.last_image_sha256 == hashlib.sha256(open(pictures[1], "rb").read()).hexdigest()
    (tmp_path / "run.yaml").write_text(dump_yaml(resolved))
    again = load_yaml(tmp_path / "run.yaml")
    assert plan_run(again).config == resolved  # the written config reproduces the run
    before = fingerprint(resolved, world_size=1)
    shutil.copy(pictures[1], first)  # the picture changes under the same name
    with pytest.raises(UserError, match=r"sampling.image: .*first.png changed since this config was written"):
        plan_run(again)
    assert fingerprint(plan_run(config).config, world_size=1) != before


def test_a_last_frame_needs_a_first_last_frame_checkpoint(tiny_folder, pictures, tmp_path):
    """Wan 2.1 I2V: a one-picture checkpoint (no pos_embed_seq_len) refuses --last-image before
    loading; a first-last-frame one (its transformer built with a position table for two pictures'
    17 CLIP tokens each) takes it, and its latents equal diffusers'."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from unison.engine.config import config_from_dict

    with pytest.raises(UserError, match="sampling.last_image: this Wan 2.1 I2V checkpoint takes one picture"):
        plan_run(config_from_dict({"model": {"family": "wan-i2v"},
                                   "sampling": {"image": pictures[0], "last_image": pictures[1]}}))
    with pytest.raises(UserError, match="sampling.last_image: this Wan 2.1 I2V checkpoint takes one picture"):
        plan_run(config_from_dict({"model": {"path": tiny_folder("wan-i2v")},
                                   "sampling": {"image": pictures[0], "last_image": pictures[1], "height": 64,
                                                "width": 64, "frames": 9, "steps": 4}}))
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folder("wan-i2v"), dtype=torch.float32)
    torch.manual_seed(5)
    pipe.transformer = WanTransformer3DModel(**{**pipe.transformer.config, "pos_embed_seq_len": 2 * 17})
    folder = tmp_path / "flf2v"
    pipe.save_pretrained(folder)
    sampling = _sampling("wan-i2v", *pictures)
    ours = Engine.from_config(RunConfig(model=ModelConfig(path=str(folder)), sampling=sampling,
                                        output=OutputConfig(decode=False, progress=False))).render().latents
    theirs = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(image=Image.open(pictures[0]).convert("RGB"), last_image=Image.open(pictures[1]).convert("RGB"),
                      prompt=sampling.prompt, negative_prompt=sampling.negative_prompt, height=64, width=64,
                      num_frames=9, num_inference_steps=4, guidance_scale=4.0, max_sequence_length=512,
                      generator=torch.Generator().manual_seed(3), output_type="latent", return_dict=False)[0]
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5


def test_cli_renders_a_picture_end_to_end(tiny_folder, pictures, tmp_path, capsys):
    """`unison generate --model DIR --image PATH`: the video is written, the resolved config beside
    it names the picture and its hash, and `--config` of that file renders the same latents."""
    import hashlib

    from unison.engine.config import load_yaml
    from unison.launch.cli import main

    out = tmp_path / "cat.mp4"
    args = ["--model", tiny_folder("wan2.2-ti2v"), "--image", pictures[0], "--output", str(out), "--steps", "2",
            "--height", "64", "--width", "64", "--frames", "5", "--save-latents", str(tmp_path / "a.pt"),
            "--set", "output.progress=false"]
    assert main(args) == 0, capsys.readouterr().err[-500:]
    resolved = load_yaml(tmp_path / "cat.yaml")
    assert out.stat().st_size > 0 and resolved.sampling.image == pictures[0]
    assert resolved.sampling.image_sha256 == hashlib.sha256(open(pictures[0], "rb").read()).hexdigest()
    again = ["--config", str(tmp_path / "cat.yaml"), "--output", str(tmp_path / "again.mp4"),
             "--save-latents", str(tmp_path / "b.pt")]
    assert main(again) == 0
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))


def test_the_image_encoder_is_an_encoder_in_float32(pictures):
    """Wan 2.1 I2V's CLIP encoder stays float32 in a bfloat16 run (as diffusers' example loads it)
    and, under model.offload, visits the device for encoding only, with the text encoder."""
    config = dataclasses.replace(_config("wan-i2v", False, pictures, ParallelConfig()),
                                 model=ModelConfig(family="wan-i2v", dtype="bfloat16", offload=True))
    engine = Engine.from_config(config)
    assert engine.pipe.image_encoder.dtype == torch.float32 and engine.pipe.transformer.dtype == torch.bfloat16
    result = engine.render()
    assert torch.isfinite(result.latents).all()
    moved = [name for name, _ in engine.offloader.moves]
    assert moved.count("image_encoder") == 2 and moved.count("text_encoder") == 2, engine.offloader.moves


def test_dry_run_names_the_picture_the_sampler_and_the_encoders_dtype(pictures, capsys):
    from unison.launch.cli import main

    assert main(["--set", "model.family=wan-i2v", "--image", pictures[0], "--set", "model.dtype=bfloat16",
                 "--scheduler", "dpm++", "--flow-shift", "5", "--set", "sampling.image_resize=pad", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"image      {pictures[0]} (pad to 64x64)" in out
    assert "sampler    dpm++, flow shift 5.0" in out
    assert "text_encoder bfloat16 on cpu, image_encoder float32 on cpu" in out


def test_wan_i2v_bfloat16_equals_diffusers_on_one_rank_and_ulysses(tiny_folder, pictures):
    """bfloat16 as real checkpoints run, exact (torch.equal; tests/test_bf16.py says why nothing
    looser is meaningful): Wan 2.1 I2V against diffusers loaded as its example loads it (the
    pipeline in bfloat16, the VAE and the CLIP encoder in float32), and Ulysses 2 against one rank."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    from multirank import render_each, run_ranks

    folder = tiny_folder("wan-i2v", "bfloat16")
    sampling = _sampling("wan-i2v", pictures[0])
    config = RunConfig(model=ModelConfig(path=folder, dtype="bfloat16"), sampling=sampling,
                       output=OutputConfig(decode=False, progress=False))
    ours = Engine.from_config(config).render().latents
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    encoder = CLIPVisionModel.from_pretrained(folder, subfolder="image_encoder", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, vae=vae, image_encoder=encoder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=Image.open(pictures[0]).convert("RGB"), prompt=sampling.prompt,
                  negative_prompt=sampling.negative_prompt, height=64, width=64, num_frames=9, num_inference_steps=4,
                  guidance_scale=4.0, max_sequence_length=512, generator=torch.Generator().manual_seed(3),
                  output_type="latent", return_dict=False)[0]
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    parallel = dataclasses.replace(config, parallel=ParallelConfig(ulysses=2, timeout_s=60))
    for latents, _ in (r[0] for r in run_ranks(2, render_each, [parallel])):
        assert torch.equal(latents, ours)


# ---- pictures as users have them: huge, lying headers, 16-bit, alpha, palette, CMYK, EXIF -----

def _png_header(path, width: int, height: int) -> str:
    """A PNG whose header claims width x height and holds no pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("make, resize, message", [
    (lambda d: _png_header(d / "bomb.png", 100000, 100000), "stretch", "is not a readable image ("),
    (lambda d: _png_header(d / "big.png", 15000, 15000), "stretch", "is not a readable image ("),
    (lambda d: _png_header(d / "wide.png", 12000, 4000), "stretch", "is 12000x4000 pixels; at most 16384 on a "
                                                                     "side and 40 megapixels"),
    (lambda d: _picture(d / "thin.png", 3, size=(1, 4000)), "pad", "(1x4000) cannot be resized to 64x64 with "
                                                                   "image_resize=pad (it would be 0x64"),
    (lambda d: _picture(d / "line.png", 3, size=(1, 16000)), "crop", "(1x16000) cannot be resized to 64x64 with "
                                                                     "image_resize=crop (it would be 64x1024000"),
], ids=["bomb-header", "15000-square", "60-megapixels", "pad-thin", "crop-line"])
def test_pictures_past_the_bounds_are_one_line_before_anything_loads(tmp_path, make, resize, message, capsys):
    """Also under --dry-run, where PIL's decompression-bomb error escaped as a traceback."""
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        plan_run(RunConfig(model=ModelConfig(family="wan2.2-i2v"),
                           sampling=_sampling("wan2.2-i2v", path, image_resize=resize)))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert main(["--set", "model.family=wan2.2-i2v", "--image", path, "--height", "64", "--width", "64",
                 "--set", f"sampling.image_resize={resize}", "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_every_picture_mode_is_read_by_its_meaning(tmp_path):
    from unison.engine.images import read

    gray16 = Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16))
    gray16.save(tmp_path / "gray16.png")
    assert np.asarray(read(str(tmp_path / "gray16.png"))).tolist() == [[[128] * 3] * 6] * 4  # not clipped to 255
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (200, 10, 10, 255)  # the left half opaque red, the right half transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(read(str(tmp_path / "alpha.png")))
    assert pixels[0, 0].tolist() == [200, 10, 10] and pixels[0, 5].tolist() == [255, 255, 255]
    palette = Image.fromarray(rgba, mode="RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((5, 0))
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((5, 0)))
    assert np.asarray(read(str(tmp_path / "palette.png")))[0, 5].tolist() == [255, 255, 255]
    Image.new("CMYK", (6, 4), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    cyan = np.asarray(read(str(tmp_path / "cyan.jpg")))[0, 0].tolist()
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245, cyan
    # A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), (0, 128, 0)).save(tmp_path / "phone.jpg", exif=exif)
    assert read(str(tmp_path / "phone.jpg")).size == (4, 8)


def test_an_image_to_video_batch_takes_each_jobs_own_picture(tmp_path, pictures, capsys):
    """Wan 2.2 I2V needs a picture: a batch whose lines each name one runs with none on the command
    line (the engine is planned with a stand-in; each job is checked and rendered with its own)."""
    import shutil

    from unison.engine.config import load_yaml

    for name, picture in (("cat.png", pictures[0]), ("dog.png", pictures[1])):
        shutil.copy(picture, tmp_path / name)
    (tmp_path / "jobs.jsonl").write_text('{"id": "cat", "prompt": "a cat", "image": "cat.png"}\n'
                                         '{"id": "dog", "prompt": "a dog", "image": "dog.png"}\n')
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(out), "--no-progress",
                 "--set", "model.family=wan2.2-i2v", "--set", "sampling.steps=2", "--set", "sampling.height=64",
                 "--set", "sampling.width=64", "--set", "sampling.frames=5", "--set", "sampling.max_sequence_length=16"])
    err = capsys.readouterr().err
    assert code == 0, err[-1500:]
    for job in ("cat", "dog"):
        recorded = load_yaml(out / f"{job}.yaml").sampling
        assert (out / f"{job}.mp4").is_file() and recorded.image == str(tmp_path / f"{job}.png")
    assert load_yaml(out / "cat.yaml").sampling.image_sha256 != load_yaml(out / "dog.yaml").sampling.image_sha256
