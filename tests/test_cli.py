"""The CLI contract: the embedded default end to end, and the table of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from unison.engine.build import plan_run
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
    import unison.engine.build as build

    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("dry run loaded weights"))
    assert main(["generate", "--dry-run", "--output", str(tmp_path / "x.mp4")]) == 0
    out = capsys.readouterr().out
    assert "Wan 2.1" in out and "64x64, 9 frames at 16 fps, 6 steps" in out
    assert not (tmp_path / "x.mp4").exists()


def test_make_tiny_folders_are_detected(tiny_folder, capsys):
    for family in ("wan", "wan2.2", "hunyuanvideo"):
        assert main(["generate", "--model", tiny_folder(family), "--dry-run"]) == 0
        assert f"[{family}]" in capsys.readouterr().out


def _bad_cases(tmp: Path, wan_folder: str) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    (tmp / "bad.yaml").write_text("model:\n  family: wan\n  colour: red\n")
    return [
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
        (["--set", "cache.kind=teacache"], "cache.kind: expected"),
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
    ]


def _bad_cases_two_ranks() -> list[tuple[list[str], str]]:
    """Bad input that only a multi-rank launch can give (the CLI under torchrun, WORLD_SIZE=2)."""
    return [
        (["--patch", "2", "--shard-weights"], "shard_weights does not combine with patch parallelism"),
        (["--patch", "2", "--pipefusion", "--ulysses", "2"], "must equal the world size 2"),
        (["--ulysses", "2", "--ring", "2"], "must equal the world size 2"),
    ]


def test_bad_input_table(tmp_path, tiny_folder, monkeypatch, capsys):
    """Each bad input: exit 2, one line on stderr naming the problem, and no weights loaded."""
    import unison.engine.build as build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "load_pipeline", lambda plan: pytest.fail("weights loaded before the error"))
    cases = _bad_cases(tmp_path, tiny_folder("wan"))
    capsys.readouterr()  # make-tiny's own output, when this test made the folder
    for argv, expected in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("unison: error: ") and expected in err, (argv, err)
        assert "\n" not in err, (argv, err)


def test_bad_input_table_two_ranks(tmp_path, monkeypatch, capsys):
    """The same contract under a launcher's environment: refused before any process group forms."""
    import unison.engine.build as build
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
