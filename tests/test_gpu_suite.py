"""The GPU suite cannot rot: its --smoke run (the same code at tiny shapes on the CPU) completes
every section, keeps every finished row on disk when it is killed, out of memory or out of time,
and its one-GPU stand-in for a rank computes exactly one rank's share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_suite  # noqa: E402


SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_completes_every_section(tmp_path):
    path, sections = gpu_suite.run_suite(smoke=True, out=tmp_path, skip_tests=True)
    assert path.is_file() and path.parent == tmp_path
    rows = [row for section in sections.values() for row in section]
    assert rows and not [row for row in rows if "error" in row], rows
    # The JSON lines hold the same rows, in order, each naming its section.
    assert [(r.pop("section"), r) for r in _jsonl(path.with_suffix(".jsonl"))] == \
        [(title, json.loads(json.dumps(row))) for title, rows in sections.items() for row in rows]
    # Parity on the CPU in float32: the engine equals diffusers' pipeline to float32 rounding.
    (wan,) = sections["bf16 parity of the tiny families with diffusers"]
    assert wan["family"] == "wan" and wan["rel_err"] <= 1e-5
    forward = sections["one forward, per-rank share of Ulysses N (compute only)"]
    assert [(r["case"], r["ranks"]) for r in forward] == [("tiny Wan", 1), ("tiny Wan", 2), ("tiny Wan", 4),
                                                          ("tiny HunyuanVideo", 1), ("tiny HunyuanVideo", 2),
                                                          ("tiny HunyuanVideo 1.5", 1), ("tiny HunyuanVideo 1.5", 2),
                                                          ("tiny SkyReels-V2 DF", 1), ("tiny SkyReels-V2 DF", 2)]
    assert all(r["seconds"] > 0 for r in forward)
    caches = {r["cache"]: r for r in sections["cache overhead, never skipping"]}
    # Never-skipping settings really never skip (else the overhead would be understated).
    assert caches["fbcache"]["skipped"] == 0 and caches["pab"]["skipped"] == 0
    assert {r["mode"] for r in sections["eager vs compiled (model.compile=blocks)"]} == {"eager", "compiled"}
    lora = {r["what"]: r for r in sections["LoRA switch vs a reload's copy to the device"]}
    # Tiny Wan: 3 blocks x (4 self- + 4 cross-attention + 2 MLP) linear layers, each LoRA on all of
    # them: 30 originals held from the first fuse on (kept when no LoRA is fused).
    assert [r["host_copies"] for r in lora.values() if "host_copies" in r] == [30, 30, 30, 30]
    assert all(r["seconds"] > 0 for r in lora.values())
    text = path.read_text()
    for title in sections:
        assert f"## {title}" in text


def _built(index: int):
    """A smoke case's transformer on the CPU in float32, and its inputs."""
    case = gpu_suite.smoke_cases()[index]
    transformer = gpu_suite.build_transformer(case, torch.device("cpu"), torch.float32)
    return case, transformer, gpu_suite.inputs(case, transformer, torch.device("cpu"), torch.float32)


def _spy_attention(monkeypatch, record) -> None:
    """record(query, key, keywords) for every scaled_dot_product_attention call."""
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        q, k = args[:2] if len(args) >= 2 else (kw["query"], kw["key"])
        record(q, k, kw)
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_a_simulated_rank_computes_one_ranks_share(monkeypatch):
    """Ulysses N on one device: the blocks see 1/N of the tokens, self-attention sees every token
    with 1/N of the heads (the shapes one rank of N computes)."""
    case, transformer, kwargs = _built(0)
    seen = []
    _spy_attention(monkeypatch, lambda q, k, kw: seen.append(("attention", tuple(q.shape), tuple(k.shape))))
    block = transformer.blocks[0]
    tokens, heads = 3 * 4 * 4, transformer.config.num_attention_heads
    for n in (1, 2, 4):
        seen.clear()
        with torch.no_grad(), gpu_suite.simulated_rank(transformer, "wan", n):
            hook = block.register_forward_pre_hook(lambda m, args: seen.append(("block", args[0].shape[1])))
            out = transformer(**kwargs)[0]
            hook.remove()
        assert out.shape == kwargs["hidden_states"].shape
        assert ("block", tokens // n) in seen
        self_attention = [s for s in seen if s[0] == "attention" and s[2][2] == tokens]
        # (batch, heads, tokens, head_dim) as sdpa takes it: every token, 1/N of the heads
        assert self_attention and all(s[1][1] == heads // n and s[1][2] == tokens for s in self_attention), seen


def test_the_one_rank_row_uses_the_shares_attention_kernel(monkeypatch):
    """HunyuanVideo: diffusers' own processor passes a mask (torch's memory-efficient kernel on a
    GPU), the shares run the engine's unmasked attention (the flash kernel): the one-rank row must
    run the shares' processors, or its row is not comparable with theirs."""
    case, transformer, kwargs = _built(1)
    masks = []
    # The video attention (the text refiner attends to text alone, masked either way).
    _spy_attention(monkeypatch, lambda q, k, kw: masks.append(kw.get("attn_mask"))
                   if q.shape[-2] > case.text_tokens else None)
    with torch.no_grad():
        plain = transformer(**kwargs)[0]
        assert masks and all(m is not None for m in masks)  # diffusers' processor masks
        masks.clear()
        with gpu_suite.simulated_rank(transformer, "hunyuanvideo", 1):
            shared = transformer(**kwargs)[0]
    assert masks and all(m is None for m in masks)
    assert torch.allclose(plain, shared, rtol=1e-4, atol=1e-5)  # the same forward, another kernel


def test_every_text_token_of_hunyuanvideo15_is_valid_and_counted(monkeypatch):
    """HunyuanVideo 1.5's inputs are its planner inputs filled (the prompt, 256 glyph and 729 image
    tokens, every mask all ones, noise for the image embeddings, so the transformer keeps them);
    the simulated rank counts all of them: one rank equals the transformer's own forward, and a
    rank of two attends over every video and text token with half the heads."""
    case, transformer, kwargs = _built(2)
    assert case.family == "hunyuanvideo1.5"
    text = case.text_tokens + 256 + 729
    assert [kwargs[k].shape[1] for k in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")] == \
        [case.text_tokens, 256, 729]
    assert all(bool(kwargs[k].all()) for k in ("encoder_attention_mask", "encoder_attention_mask_2"))
    assert kwargs["image_embeds"].std() > 0.5 and kwargs["timestep"].tolist() == [500.0]
    shape = gpu_suite._shape(case, transformer)
    assert (shape.video_tokens, shape.joint_text_tokens, shape.attentions) == (3 * 8 * 8, text, 4)
    keys = []
    _spy_attention(monkeypatch, lambda q, k, kw: keys.append((q.shape[1], k.shape[2])))
    heads = transformer.config.num_attention_heads
    with torch.no_grad():
        plain = transformer(**kwargs)[0]
        with gpu_suite.simulated_rank(transformer, case.family, 1):
            one = transformer(**kwargs)[0]
        keys.clear()
        with gpu_suite.simulated_rank(transformer, case.family, 2):
            two = transformer(**kwargs)[0]
    assert torch.allclose(plain, one, rtol=1e-4, atol=1e-5)
    assert two.shape == plain.shape
    # (heads, keys) of the blocks' joint attention; the token refiner attends over the prompt alone.
    assert [k for k in keys if k[1] > case.text_tokens] == [(heads // 2, shape.video_tokens + text)] * 4


def test_each_suite_case_of_a_checkpoint_is_the_shape_calibration_counts():
    """launch/calibrate.py reads a forward row's checkpoint and video size from its case name and
    counts that checkpoint's forward at the size, with its default text length: each checkpoint's
    suite_case names a real case, whose latents and text are what the planner counts there."""
    from unison.engine.models import checkpoints
    from unison.engine.planner import model as plan_model
    from unison.launch.calibrate import CASE_NAME

    cases = {CASE_NAME.match(case.name).group(1): case for case in gpu_suite.real_cases()}
    named = {c.suite_case: c.name for _, c in checkpoints().values() if c.suite_case}
    assert {"Wan 2.1 14B", "HunyuanVideo", "HunyuanVideo 1.5"} <= set(named) <= set(cases)
    for suite_case, name in named.items():
        case = cases[suite_case]
        height, width, frames = map(int, CASE_NAME.match(case.name).groups()[1:])
        spec, parts = plan_model.published(name)
        latent = plan_model.latent_shape(spec, parts, height=height, width=width, frames=frames)
        assert (case.family, case.latents[2:], case.text_tokens) == \
            (spec.family, latent[1:], spec.defaults.max_sequence_length), suite_case


def test_a_killed_suite_leaves_its_finished_rows_on_disk(tmp_path):
    """SIGKILL once two forward rows are reported: both result files hold them, readable (the
    markdown by the planner's own reader)."""
    from unison.engine.planner.hardware import suite_forward_rows

    proc = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--skip-tests", "--sections",
                             "forward,compile,caches,vae", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        found = []
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("*.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    (jsonl,) = found
    rows = _jsonl(jsonl)
    assert len(rows) >= 2 and rows[0]["case"] == "tiny Wan" and rows[0]["ranks"] == 1
    table = suite_forward_rows(jsonl.with_suffix(".md"))
    assert [(r["case"], int(r["ranks"])) for r in table][:2] == [("tiny Wan", 1), ("tiny Wan", 2)]
    assert not list(tmp_path.glob("*.part"))


def test_a_failing_row_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    """Out of memory while building HunyuanVideo: its row records it, the other rows and the next
    section still run."""
    build = gpu_suite.build_transformer

    def oom_for_hunyuan(case, device, dtype):
        if case.family == "hunyuanvideo":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return build(case, device, dtype)

    monkeypatch.setattr(gpu_suite, "build_transformer", oom_for_hunyuan)
    path, sections = gpu_suite.run_suite(smoke=True, out=tmp_path, sections=["forward", "vae"])
    forward = sections[gpu_suite.FORWARD_TITLE]
    assert [(r["case"], r["ranks"]) for r in forward] == [("tiny Wan", 1), ("tiny Wan", 2), ("tiny Wan", 4),
                                                          ("tiny HunyuanVideo", "1,2"), ("tiny HunyuanVideo 1.5", 1),
                                                          ("tiny HunyuanVideo 1.5", 2), ("tiny SkyReels-V2 DF", 1),
                                                          ("tiny SkyReels-V2 DF", 2)]
    assert forward[3]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "seconds" in sections["VAE decode, float32"][0]
    assert "OutOfMemoryError" in path.read_text()


def test_sections_past_the_budget_are_skipped_with_the_reason(tmp_path):
    path, sections = gpu_suite.run_suite(smoke=True, out=tmp_path, budget=0.5, sections=["forward", "vae"])
    assert sections == {gpu_suite.FORWARD_TITLE: [], "VAE decode, float32": []}
    assert path.read_text().count("Skipped: needs about 1 s, 0 s of the budget left.") == 2


def test_a_section_past_its_limit_keeps_its_rows_and_the_suite_goes_on(tmp_path, monkeypatch):
    def stuck(ctx, limit):
        yield {"step": "done"}
        time.sleep(120)  # a kernel that never returns, as far as the suite can tell
        yield {"step": "never"}

    sections = [gpu_suite.Section("stuck", "stuck", stuck, 1, 1), *gpu_suite.SECTIONS[-1:]]
    monkeypatch.setattr(gpu_suite, "SECTIONS", sections)
    t0 = time.monotonic()
    path, rows = gpu_suite.run_suite(smoke=True, out=tmp_path, budget=3)
    assert time.monotonic() - t0 < 60
    assert rows["stuck"] == [{"step": "done"}, {"error": "section stopped at its limit of 3 s"}]
    assert "VAE decode, float32" in rows  # recorded: run, or skipped for the budget


def test_a_section_that_fails_outside_its_rows_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(ctx, limit):
        raise torch.OutOfMemoryError("CUDA out of memory while building the VAE")
        yield  # a generator, as every section is

    monkeypatch.setattr(gpu_suite, "SECTIONS", [gpu_suite.Section("broken", "broken", broken, 1, 1),
                                                *gpu_suite.SECTIONS[-1:]])
    _, rows = gpu_suite.run_suite(smoke=True, out=tmp_path)
    assert rows["broken"] == [{"error": "OutOfMemoryError: CUDA out of memory while building the VAE"}]
    assert "seconds" in rows["VAE decode, float32"][0]


def test_smoke_writes_into_a_temporary_folder_not_the_checkout(capsys):
    results = SUITE.parent / "results"
    before = set(results.iterdir())
    gpu_suite.main(["--smoke", "--sections", "vae"])
    assert set(results.iterdir()) == before
    written = Path(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert written.is_file() and SUITE.parent.parent not in written.parents
    assert written.parent.name.startswith("gpu-suite-smoke-")


@pytest.mark.parametrize("argv, message", [(["--sections", "forward,nope"], "unknown section(s) nope"),
                                           (["--budget", "0"], "--budget must be positive")])
def test_bad_suite_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_suite.main(["--smoke", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
