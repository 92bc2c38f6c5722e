"""The CLI contract: the embedded default end to end, and the table of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from unison.engine.plan import plan_run
from unison.engine.config import load_yaml
from unison.launch.cli import main


def test_embedded_default_end_to_end(tmp_path):
    """`python -m unison` with no arguments, in a fresh process: an mp4 in the current folder."""
    proc = subprocess.run([sys.executable, "-m", "unison"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    video, beside = tmp_path / "unison.mp4", tmp_path / "unison.yaml"
    frames = iio.imread(video, index=None)
    assert frames.shape == (9, 64, 64, 3)
    assert "s/step median" in proc.stdout and "peak" in proc.stdout
    config = load_yaml(beside)
    assert config.model.family == "wan" and config.sampling.frames == 9 and config.output.fps == 16
    # The saved config is fully resolved: planning it again changes nothing.
    assert plan_run(config).config == config
    assert not list(tmp_path.glob(".*part*")), "temporary files left behind"


def test_save_latents_and_rerun_from_saved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--steps", "2", "--frames", "5", "--output", "a/first.mp4", "--save-latents", "a/first.pt"]) == 0
    first = torch.load(tmp_path / "a/first.pt")
    assert first.shape == (1, 16, 2, 8, 8)
    assert main(["--config", str(tmp_path / "a/first.yaml"), "--output", "b/second.mp4",
                 "--save-latents", "b/second.pt"]) == 0
    assert torch.equal(torch.load(tmp_path / "b/second.pt"), first)
    assert iio.imread(tmp_path / "b/second.mp4", index=None).shape == (5, 64, 64, 3)


def test_dry_run_loads_nothing(tmp_path, monkeypatch, capsys):
    import unison.engine.load as build

    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("dry run loaded weights"))
    assert main(["generate", "--dry-run", "--output", str(tmp_path / "x.mp4")]) == 0
    out = capsys.readouterr().out
    assert "Wan 2.1" in out and "64x64, 9 frames at 16 fps, 6 steps" in out
    assert not (tmp_path / "x.mp4").exists()


def test_make_tiny_folders_are_detected(tiny_folder, capsys):
    for family in ("wan", "wan2.2", "hunyuanvideo"):
        # Width 64: a tiny Wan folder's position table ends at 512 pixels (the real defaults are 832 wide).
        assert main(["generate", "--model", tiny_folder(family), "--dry-run", "--width", "64"]) == 0
        assert f"[{family}]" in capsys.readouterr().out


def test_an_image_folder_is_sized_by_its_picture_and_a_step_distilled_one_refused(tiny_folder, tmp_path, capsys):
    """A HunyuanVideo 1.5 I2V folder is detected, and with no size given the video takes the
    pipeline's own size for the picture (its image processor's bucket nearest the picture's aspect
    at the transformer's target_size, computed here by diffusers); a copy marked step-distilled
    (use_meanflow) is refused in one line before loading."""
    import json
    import shutil

    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
    from PIL import Image

    folder = tiny_folder("hunyuanvideo1.5-i2v")
    picture = tmp_path / "wide.png"
    # 192 x 60: a bucket of the tiny VAE's 4-pixel ones that is a multiple of 16 (16 x 48).
    Image.new("RGB", (192, 60), (90, 120, 30)).save(picture)
    config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    height, width = HunyuanVideo15ImageProcessor(vae_scale_factor=vae["spatial_compression_ratio"]) \
        .calculate_default_height_width(height=60, width=192, target_size=config["target_size"])
    capsys.readouterr()
    assert main(["generate", "--model", folder, "--image", str(picture), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[hunyuanvideo1.5-i2v]" in out and f"{width}x{height}" in out, out
    distilled = tmp_path / "distilled"
    shutil.copytree(folder, distilled)
    (distilled / "transformer" / "config.json").write_text(json.dumps({**config, "use_meanflow": True}))
    assert main(["generate", "--model", str(distilled), "--image", str(picture), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step-distilled (use_meanflow: true)" in err and "\n" not in err


def _bad_cases(tmp: Path, wan_folder: str) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    (tmp / "bad.yaml").write_text("model:\n  family: wan\n  colour: red\n")
    (tmp / "nan.yaml").write_text("model:\n  family: wan\nsampling:\n  guidance: .nan\n")
    _odd_files(tmp, wan_folder)
    weights = f"{wan_folder}/transformer/diffusion_pytorch_model.safetensors"
    slurm = ["slurm", "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "1"]
    batch = ["batch", str(tmp / "jobs.jsonl"), "--out"]
    model = ["--config", "tiny-wan.yaml", "--model", wan_folder]  # the tiny folder at the sizes it takes
    return [
        # Class 4: outputs never land inside the model folder, nor on each other (real paths compared).
        ([*model, "--save-latents", weights], f"output.save_latents ({weights}) is inside the model folder"),
        ([*model, "--save-latents", str(tmp / "model-link" / "vae" / "x.pt")], "inside the model folder"),
        ([*model, "--output", f"{wan_folder}/out.mp4"], "output.path (" + wan_folder + "/out.mp4) is inside"),
        (["--output", str(tmp / "v.mp4"), "--save-latents", str(tmp / "empty" / ".." / "v.mp4")],
         "is the same file as output.path"),
        (["--output", str(tmp / "v.mp4"), "--save-latents", str(tmp / "v.mp4")], "is the same file as output.path"),
        (["--output", str(tmp / "v.mp4"), "--save-latents", str(tmp / "v.yaml")],
         "is the same file as the config written beside output.path"),
        (["--output", str(tmp / "clash.mp4")], "the config written beside output.path is a folder"),
        ([*batch, f"{wan_folder}/videos", *model], "is inside the model folder"),
        ([*batch, wan_folder, *model], "is inside the model folder"),
        ([*batch, str(tmp / "a-file")], "--out is a file, not a folder"),
        ([*batch, str(tmp / "out"), "--set", "output.save_latents=l.pt"], "every job of a batch would overwrite"),
        # Class 5: odd files are one line each.
        (["--config", str(tmp / "binary.yaml")], "binary.yaml: not UTF-8 text (byte 0x89 at offset 0)"),
        (["--config", str(tmp / "latin1.yaml")], "latin1.yaml: not UTF-8 text (byte 0xe9"),
        (["--config", str(tmp / "nul.yaml")], "not valid YAML (unacceptable character #x0000"),
        (["--config", str(tmp / "deep.yaml")], "deep.yaml: not readable YAML"),
        (["--config", str(tmp / "empty")], "config file is a folder"),
        (["--model", str(tmp / "index-list")], "model_index.json: expected a JSON object, got list"),
        (["--model", str(tmp / "index-binary")], "model_index.json: not UTF-8 text"),
        (["--model", str(tmp / "index-text")], "model_index.json: not valid JSON"),
        (["--model", str(tmp / "index-deep")], "model_index.json: not readable JSON"),
        (["--model", str(tmp / "index-no-class")], "'_class_name' must name the pipeline class"),
        (["--model", str(tmp / "index-bad-entry")], "component 'transformer_2' must be [library, class]"),
        (["--model", str(tmp / "config-binary")], "transformer/config.json: not UTF-8 text"),
        (["batch", str(tmp / "binary.jsonl"), "--out", str(tmp / "out")], "not a text file (it holds NUL bytes"),
        (["batch", str(tmp / "empty"), "--out", str(tmp / "out")], "jobs file is a folder"),
        ([*batch, str(tmp / "out-manifest-folder")], "manifest.jsonl is not a file (a folder?)"),
        ([*batch, str(tmp / "out-manifest-typed")], "line 2: not a valid record ('attempts' should be int"),
        ([*batch, str(tmp / "out-manifest-binary")], "line 1: not a manifest record (binary data)"),
        ([*batch, str(tmp / "out-manifest-latin1")], "line 1: not a manifest record (not UTF-8 text: byte 0xe9"),
        ([*batch, str(tmp / "out-manifest-list")], "line 1: expected a JSON object (a record), got list"),
        # Class 9: flags that would be ignored, or mean nothing.
        (["--ranks-per-engine", "2"], "--ranks-per-engine needs --ray"),
        (["--ray", "local", "--ranks-per-engine", "0"], "--ranks-per-engine must be at least 1, got 0"),
        (["--ray", "local", "--ranks-per-engine", "-2"], "--ranks-per-engine must be at least 1, got -2"),
        ([*batch, str(tmp / "out"), "--ray", "local", "--engines", "0"], "--engines must be at least 1, got 0"),
        ([*batch, str(tmp / "out"), "--ray", "local", "--ranks-per-engine", "0"], "--ranks-per-engine must be"),
        ([*batch, str(tmp / "out"), "--engines", "2"], "--engines needs --ray"),
        # Class 10: `unison slurm` prints a script only for safe values and a recipe that plans.
        ([*slurm, "--job-name", "x\nrm -rf ~"], "--job-name must be 1-128 letters"),
        ([*slurm, "--job-name", "a b"], "--job-name must be"),
        ([*slurm, "--partition", "gpu large"], "--partition must be a partition name"),
        ([*slurm, "--partition", "gpu\n#SBATCH --exclusive"], "--partition must be"),
        ([*slurm, "--cpus-per-gpu", "-1"], "--cpus-per-gpu must be at least 1, got -1"),
        (["slurm", "--config", "tiny-wan.yaml", "--nodes", "-1", "--gpus-per-node", "1"], "--nodes must be at least 1"),
        (["slurm", "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "-4"], "--gpus-per-node must be"),
        ([*slurm, "--time", "4h"], "--time must be MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
        ([*slurm, "--time", "1:2:3:4"], "--time must be"),
        ([*slurm, "--time", "10:75"], "--time must be"),
        ([*slurm, "--time", "1-24"], "--time must be"),
        ([*slurm, "--time", "04:00:00; reboot"], "--time must be"),
        ([*slurm, "--ranks-per-engine", "1"], "--ranks-per-engine is for --mode ray"),
        (["slurm", "--config", str(tmp / "frames.yaml"), "--nodes", "1", "--gpus-per-node", "1"],
         "frames.yaml: Wan 2.1 T2V (1.3B, 14B) takes 4k+1 frames"),
        (["slurm", "--config", str(tmp / "height.yaml"), "--nodes", "1", "--gpus-per-node", "1"],
         "height.yaml: sampling.height must be a positive multiple of 16"),
        (["slurm", "--mode", "ray", "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "2",
          "--jobs", "j.jsonl", "--ranks-per-engine", "2"], "must equal the world size 2"),
        (["slurm", "--mode", "ray", "--config", "tiny-wan.yaml", "--nodes", "1", "--gpus-per-node", "1",
          "--jobs", "j.jsonl", "--ranks-per-engine", "0"], "--ranks-per-engine must be at least 1"),
        # Class 3: NaN and infinity, from flags, --set (as YAML spells them or not) and YAML files.
        (["--guidance", "nan"], "sampling.guidance must be a finite number, got nan"),
        (["--guidance=-inf"], "sampling.guidance must be a finite number, got -inf"),
        (["--guidance", "1e400"], "sampling.guidance must be a finite number, got inf"),
        (["--guidance-2", "inf"], "sampling.guidance_2 must be a finite number"),
        (["--set", "sampling.guidance=.nan"], "sampling.guidance must be a finite number"),
        (["--set", "sampling.guidance=Infinity"], "sampling.guidance must be a finite number, got 'Infinity'"),
        (["--set", "sampling.guidance=1" + "0" * 400], "must be a finite number, got an integer of about 401 digits"),
        (["--cache", "fbcache", "--set", "cache.threshold=.nan"], "cache.threshold must be a finite number"),
        (["--cache", "pab", "--set", "cache.self_timestep_max=.inf"], "cache.self_timestep_max must be a finite"),
        (["--set", "model.family=hunyuanvideo", "--set", "sampling.true_cfg_scale=-.inf"],
         "sampling.true_cfg_scale must be a finite number"),
        (["--set", "parallel.timeout_s=.inf"], "parallel.timeout_s must be a finite number"),
        (["--config", str(tmp / "nan.yaml")], "nan.yaml: sampling.guidance must be a finite number, got nan"),
        # Class 2: values past what the model (read from its configs, no weights) or torch takes.
        (["--seed", str(2**64)], "sampling.seed must be between -2**63 and 2**64-1"),
        (["--seed", str(-2**63 - 1)], "sampling.seed must be between"),
        (["--set", "model.tiny_seed=18446744073709551614"], "model.tiny_seed must be between -2**63 and 2**64-3"),
        (["make-tiny", "--family", "wan", "--out", str(tmp / "t"), "--seed", str(2**64)], "--seed must be between"),
        (["--height", "528"], "sampling.height=528 runs past the position table of Wan 2.1 T2V (1.3B, 14B): "
                              "at most 512 (the transformer's rope_max_seq_len, 32 positions per axis"),
        (["--width", "100000"], "sampling.width=100000 runs past the position table"),
        (["--frames", "129"], "sampling.frames=129 runs past the position table of Wan 2.1 T2V (1.3B, 14B): at most 125"),
        (["--set", "model.family=wan2.2-ti2v", "--height", "1056"], "at most 1024"),
        (["--set", "model.family=wan2.2", "--width", "528"], "sampling.width=528 runs past"),
        (["--config", "tiny-wan.yaml", "--model", wan_folder, "--height", "528"], "height=528 runs past"),
        (["--set", "model.family=hunyuanvideo", "--height", "65536", "--width", "65536"],
         "65536x65536, 9 frames is 50,331,648 video tokens; at most 4,194,304"),
        (["--set", "model.family=hunyuanvideo", "--frames", "4000001"], "video tokens; at most"),
        (["--set", "sampling.max_sequence_length=513"], "max_sequence_length=513 is more text tokens than Wan 2.1"),
        (["--set", "sampling.max_sequence_length=10000000000"], "at most 512 (the text length Wan was trained with)"),
        (["--set", "model.family=hunyuanvideo", "--set", "sampling.max_sequence_length=930"],
         "at most 929 (the Llama text encoder's max_position_embeddings 1024 less the 95-token prompt template)"),
        (["--set", "model.family=hunyuanvideo1.5", "--set", "sampling.max_sequence_length=1001"],
         "at most 1000 (the text length HunyuanVideo 1.5 was trained with)"),
        (["--set", "model.family=hunyuanvideo1.5", "--prompt", 'a sign reading "' + "ab" * 126 + '"'],
         "sampling.prompt: the quoted text makes 262 ByT5 tokens"),
        (["--set", "model.family=hunyuanvideo1.5", "--negative-prompt", "“" + "é" * 125 + "”"],
         "sampling.negative_prompt: the quoted text makes 260 ByT5 tokens"),
        (["--set", "model.family=hunyuanvideo1.5", "--frames", "12"], "takes 4k+1 frames"),
        (["--set", "model.family=hunyuanvideo1.5", "--width", "840"], "sampling.width must be a positive multiple of 16"),
        (["--set", "model.family=hunyuanvideo1.5", "--image", str(tmp / "a-file")],
         "sampling.image: hunyuanvideo1.5 is a text-to-video model; image-to-video needs"),
        (["--steps", "1001"], "sampling.steps=1001 is more than the scheduler's 1000 training timesteps"),
        (["--steps", "10000000000"], "sampling.steps=10000000000 is more than"),
        (["--set", "parallel.timeout_s=5"], "parallel.timeout_s must be between 10 and 86400 seconds, got 5"),
        (["--set", "parallel.timeout_s=0.001"], "parallel.timeout_s must be between 10 and 86400"),
        (["--set", "parallel.timeout_s=1000000"], "parallel.timeout_s must be between 10 and 86400"),
        (["--frames", "10"], "takes 4k+1 frames"),
        (["--frames", "0"], "takes 4k+1 frames"),
        (["--height", "60"], "sampling.height must be a positive multiple of 16"),
        (["--width", "100"], "sampling.width must be a positive multiple of 16"),
        (["--set", "model.family=wan2.2-ti2v", "--height", "48"], "multiple of 32"),
        (["--steps", "0"], "sampling.steps must be at least 1"),
        (["--model", str(tmp / "nowhere")], "model folder not found"),
        (["--model", str(tmp / "empty")], "not a diffusers pipeline folder (no model_index.json)"),
        (["--model", wan_folder, "--set", "model.family=hunyuanvideo"], "holds a wan model"),
        (["--set", "sampling.colour=red"], "unknown config key 'sampling.colour'"),
        (["--set", "colour.x=1"], "unknown config section 'colour'"),
        (["--set", "sampling.steps=many"], "sampling.steps: expected int"),
        (["--set", "sampling.guidance=high"], "sampling.guidance: expected float"),
        (["--set", "model.dtype=float64"], "model.dtype: expected"),
        (["--cache", "fbcache", "--set", "cache.threshold=-0.1"], "cache.threshold must be at least 0"),
        (["--cache", "fbcache", "--set", "cache.max_consecutive_skips=0"], "cache.max_consecutive_skips must be"),
        (["--cache", "pab", "--set", "cache.self_skip_range=0"], "cache.self_skip_range must be at least 1"),
        (["--cache", "pab", "--set", "cache.cross_timestep_min=900"], "cross_timestep_min (900.0) must be below"),
        (["--set", "cache.kind=nosuchcache"], "cache.kind: expected one of none, fbcache, pab, magcache"),
        (["--cache", "nosuchcache"], "cache.kind: expected one of none, fbcache, pab, magcache"),
        (["--cache", "pab", "--set", "cache.threshold=0.1"],
         "unknown config key 'cache.threshold' for cache kind pab; allowed in 'pab': kind, verify, self_skip_range"),
        (["--cache", "fbcache", "--set", "cache.max_skip_steps=2"],
         "unknown config key 'cache.max_skip_steps' for cache kind fbcache; allowed in 'fbcache': kind, verify, "
         "threshold, warmup_steps, max_consecutive_skips, joint_cfg"),
        (["--set", "cache.threshold=0.1"], "unknown config key 'cache.threshold' for cache kind none; allowed in "
         "'none': kind, verify"),
        (["--cache", "magcache"], "cache.mag_ratios must be given: MagCache needs this model's per-step magnitude"),
        (["--cache", "magcache", "--set", "cache.mag_ratios=[0.9]"], "cache.mag_ratios needs at least 2 values"),
        (["--cache", "magcache", "--set", "cache.preset=wan2.1-t2v-1.3b", "--set", "cache.threshold=nan"],
         "cache.threshold must be a finite number"),
        (["--config", str(tmp / "bad.yaml")], "unknown config key 'model.colour'"),
        (["--config", str(tmp / "missing.yaml")], "config file not found"),
        (["--set", "model.family=hunyuanvideo", "--guidance-2", "3"], "no meaning for HunyuanVideo"),
        (["--guidance-2", "3"], "low-noise expert"),
        (["--set", "sampling.true_cfg_scale=2"], "true_cfg_scale is HunyuanVideo's"),
        (["--set", "model.family=hunyuanvideo", "--set", "sampling.true_cfg_scale=3",
          "--set", "sampling.negative_prompt=null"], "needs a negative prompt"),
        (["--set", "model.family=sora"], "unknown model family 'sora'"),
        (["--output", str(tmp / "a-file" / "x.mp4")], "output.path cannot be written"),
        (["--output", str(tmp / "x.avi")], "output.path must end with .mp4"),
        (["--output", str(tmp)], "must end with .mp4"),
        (["--set", "parallel.ulysses=2"], "must equal the world size 1"),
        (["--set", "parallel.cfg=3", "--set", "parallel.ulysses=1"], "parallel.cfg must be 1 or 2"),
        (["--set", "sampling"], "--set expects section.key=value"),
        (["--attention-backend", "flash-attn"], "attention_backend=flash-attn needs a CUDA GPU"),
        (["--set", "parallel.attention_backend=flashattn"], "parallel.attention_backend: expected"),
        (["--set", "model.compile=max"], "model.compile: expected"),
        (["--set", "output.fps=1180591620717411303424"], "output.fps must be at most 1000"),
        *_not_ours(tmp, wan_folder),
        (["calibrate", "--cache", "magcache", "--steps", "1", "--out", str(tmp / "m.yaml")],
         "calibrate --cache magcache needs at least 2 steps"),
        (["--pipefusion"], "parallel.patch_mode=pipefusion (--pipefusion) needs patch parallelism"),
    ]


def _not_ours(tmp: Path, wan_folder: str) -> list[tuple[list[str], str]]:
    """Files that are not unison's are never written over or removed: a user's folder as the
    checkpoint folder, a checkpoint folder on the video, inside the model folder or on a file,
    the input recipe replaced by the resolved config or a calibrated recipe, a recipe written
    into the model folder."""
    (tmp / "mine").mkdir(exist_ok=True)
    (tmp / "mine" / "manifest.json").write_text('{"my": "own manifest"}\n')
    (tmp / "recipe.yaml").write_text("# my comments\nmodel:\n  family: wan\n")
    (tmp / "beside.yaml").write_text(f"model:\n  family: wan\noutput:\n  path: {tmp / 'beside.mp4'}\n")
    calibrate = ["calibrate", "--cache", "magcache", "--steps", "2"]
    return [
        (["--set", f"output.checkpoint_dir={tmp / 'mine'}"], f"output.checkpoint_dir {tmp / 'mine'} holds files "
                                                             f"unison did not write"),
        (["--set", f"output.checkpoint_dir={tmp / 'a-file'}"], "is a file, not a folder"),
        (["--output", str(tmp / "v.mp4"), "--set", f"output.checkpoint_dir={tmp / 'v.mp4'}"],
         "output.checkpoint_dir (" + str(tmp / "v.mp4") + ") is the same path as output.path"),
        (["--model", wan_folder, "--config", "tiny-wan.yaml", "--set", f"output.checkpoint_dir={wan_folder}/ckpt"],
         "output.checkpoint_dir (" + f"{wan_folder}/ckpt) is inside the model folder"),
        (["--config", str(tmp / "recipe.yaml"), "--output", str(tmp / "recipe.mp4")],
         "the config written beside output.path (" + str(tmp / "recipe.yaml") + ") would overwrite --config"),
        (["--config", str(tmp / "beside.yaml")], "would overwrite --config (" + str(tmp / "beside.yaml")),
        ([*calibrate, "--model", wan_folder, "--config", "tiny-wan.yaml", "--out", f"{wan_folder}/model_index.json"],
         "--out (" + f"{wan_folder}/model_index.json) is inside the model folder"),
        ([*calibrate, "--config", str(tmp / "recipe.yaml"), "--out", str(tmp / "recipe.yaml")],
         "--out (" + str(tmp / "recipe.yaml") + ") would overwrite --config"),
    ]


def _odd_files(tmp: Path, wan_folder: str) -> None:
    """Files that are not what their names say, and outputs that would collide (for _bad_cases)."""
    (tmp / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp / "latin1.yaml").write_bytes("sampling:\n  prompt: caf\u00e9\n".encode("latin-1"))
    (tmp / "nul.yaml").write_bytes(b"sampling:\n  prompt: a\x00b\n")
    (tmp / "deep.yaml").write_text("[" * 20000)
    (tmp / "frames.yaml").write_text("model:\n  family: wan\nsampling:\n  frames: 10\n")
    (tmp / "height.yaml").write_text("model:\n  family: wan\nsampling:\n  height: 60\n")
    (tmp / "clash.yaml").mkdir(exist_ok=True)
    if not (tmp / "model-link").exists():
        (tmp / "model-link").symlink_to(wan_folder)
    index = json.loads((Path(wan_folder) / "model_index.json").read_text())
    for name, content in {"index-list": b"[1, 2]", "index-binary": b"\xff\xfe{\x00", "index-text": b"model",
                          "index-deep": b"[" * 100000, "index-no-class": b"{}",
                          "index-bad-entry": json.dumps({**index, "transformer_2": []}).encode(),
                          "config-binary": json.dumps(index).encode()}.items():
        (tmp / name).mkdir(exist_ok=True)
        (tmp / name / "model_index.json").write_bytes(content)
    for part in ("transformer", "vae"):
        (tmp / "config-binary" / part).mkdir(exist_ok=True)
        shutil.copy(Path(wan_folder) / part / "config.json", tmp / "config-binary" / part / "config.json")
    (tmp / "config-binary" / "transformer" / "config.json").write_bytes(b"\x00\xff" * 8)
    (tmp / "jobs.jsonl").write_text('{"id": "a", "prompt": "a cat"}\n')
    (tmp / "binary.jsonl").write_bytes(b"\x00\x01\x02\n" * 4)
    record = {"id": "a", "status": "done", "attempts": 1, "seconds": 1.0}
    for name, content in {"typed": json.dumps(record) + "\n" + json.dumps({**record, "attempts": "two"}) + "\n",
                          "binary": "\x00\x9f\x92\n", "list": "[1]\n", "folder": None,
                          "latin1": json.dumps({**record, "error": "caf\u00e9"}, ensure_ascii=False) + "\n"}.items():
        out = tmp / f"out-manifest-{name}"
        out.mkdir(exist_ok=True)
        if content is None:
            (out / "manifest.jsonl").mkdir(exist_ok=True)
        else:
            (out / "manifest.jsonl").write_bytes(content.encode("latin-1"))


def _snapshot(*folders: str | Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` (links not followed): size and modification time."""
    return {str(path): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for folder in folders for path in Path(folder).rglob("*")}


def _bad_cases_two_ranks() -> list[tuple[list[str], str]]:
    """Bad input that only a multi-rank launch can give (the CLI under torchrun, WORLD_SIZE=2)."""
    return [
        (["--patch", "2", "--shard-weights"], "shard_weights does not combine with patch parallelism"),
        (["--patch", "2", "--pipefusion", "--ulysses", "2"], "must equal the world size 2"),
        (["--ulysses", "2", "--ring", "2"], "must equal the world size 2"),
    ]


def test_bad_input_table(tmp_path, tiny_folder, monkeypatch, capsys):
    """Each bad input: exit 2, one line on stderr naming the problem, and no weights loaded."""
    import unison.engine.load as build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("weights loaded before the error"))
    wan_folder = tiny_folder("wan")
    cases = _bad_cases(tmp_path, wan_folder)
    capsys.readouterr()  # make-tiny's own output, when this test made the folder
    before = _snapshot(tmp_path, wan_folder)
    for argv, expected in cases:
        code = main(argv)
        out, err = capsys.readouterr()
        err = err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("unison: error: ") and expected in err, (argv, err)
        assert "\n" not in err, (argv, err)
        assert out == "", (argv, out[:300])  # no script, no plan
    # Nothing written, nothing overwritten: not the model's weights, not an output, not a manifest.
    assert _snapshot(tmp_path, wan_folder) == before


def test_bad_input_table_two_ranks(tmp_path, monkeypatch, capsys):
    """The same contract under a launcher's environment: refused before any process group forms."""
    import unison.engine.load as build
    import unison.launch.dist as dist_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("weights loaded before the error"))
    monkeypatch.setattr(dist_module.DistEnv, "init", lambda *a, **k: pytest.fail("joined a group before the error"))
    for argv, expected in _bad_cases_two_ranks():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("unison: error: ") and expected in err and "\n" not in err, (argv, err)


def test_compile_where_it_cannot_run(monkeypatch, capsys):
    """No C++ compiler for inductor's CPU backend: one line and exit 2 before anything loads."""
    import unison.engine.placement as placement

    monkeypatch.setattr(placement.shutil, "which", lambda name: None)
    assert main(["--compile", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.compile=blocks on the CPU needs a C++ compiler" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(capsys):
    assert main(["--set", "model.device=cuda", "--dry-run"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_mp4_without_imageio_ffmpeg_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """imageio-ffmpeg (68 MB, the ffmpeg binary inside) is needed only to write the mp4: without it
    a video is one line and exit 2 before loading; latents alone still render."""
    import unison.engine.targets as targets

    real = targets.importlib.util.find_spec
    monkeypatch.setattr(targets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'imageio-ffmpeg' package" in err and err.count("\n") == 1
    assert main(["--set", "output.decode=false", "--save-latents", "z.pt", "--steps", "1"]) == 0
    assert (tmp_path / "z.pt").is_file() and not (tmp_path / "unison.mp4").exists()


def test_a_compiler_that_does_not_work_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    """A C++ compiler on PATH that fails: a tiny program compiled in a child process says so before
    anything loads; the answer is remembered per machine and toolchain."""
    import subprocess

    from unison.engine import compile_probe

    broken = tmp_path / "broken-g++"
    broken.write_text("#!/bin/sh\necho 'fatal error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(broken))
    assert main(["--compile", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unison: error: model.compile=blocks: torch.compile does not work on this machine's cpu "
                          "toolchain (a tiny program failed: ") and "C++ compiler" in err and err.count("\n") == 1
    assert json.loads(compile_probe.cache_file().read_text())[compile_probe.key("cpu")]["works"] is False
    # Remembered: no child process the second time.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probed again"))
    assert main(["--compile", "--dry-run"]) == 2 and "does not work" in capsys.readouterr().err
    monkeypatch.undo()
