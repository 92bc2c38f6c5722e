"""Guards against values that pass validation and then fail late (issue 15, classes 2, 3 and 7):
limits read from the model's own configs equal what the built model takes; latents that stop
being finite end the render before anything is written, naming the step and the expert; and a
batch records a job that fails the same way every time as failed, without retrying it.

The bad-input rows themselves (exit 2, one line, nothing loaded) live in tests/test_cli.py's
table and tests/test_batch.py's BAD_LINES."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from unison.caching.agree import CacheDisagreement
from unison.engine.limits import config_reader
from unison.engine.config import ModelConfig
from unison.engine.loop import FiniteCheck
from unison.engine.models import SPECS, get_spec
from unison.engine.errors import NonFiniteLatents, PeerFailed, UserError, WriteFailed
from unison.launch.batch import retryable
from unison.launch.cli import main


def _pipe_reader(pipe):
    """read(name) over a built pipeline's component configs, as a saved folder would give them."""
    def read(name: str) -> dict:
        component = getattr(pipe, name.split("/")[0], None)
        if component is None:
            return {}
        if name.startswith("tokenizer"):
            return {"model_max_length": component.model_max_length}
        config = component.config  # diffusers: a FrozenDict; transformers: a PretrainedConfig
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)

    return read


@pytest.mark.parametrize("family", sorted(SPECS))
def test_tiny_limits_match_the_built_model(family):
    """The limits a plan reads from a tiny spec's tiny_configs equal those of the model it builds."""
    spec = get_spec(family)
    pipe = spec.build_tiny(0)
    tiny = config_reader(ModelConfig(family=family), spec)
    assert spec.limits(tiny) == spec.limits(_pipe_reader(pipe))
    assert pipe.scheduler.config.num_train_timesteps == 1000  # the plan's default when tiny_configs has none


def test_every_tiny_preset_declares_the_blocks_it_builds():
    """The block count a plan reads (ModelSpec.block_count over tiny_configs) is the built model's,
    counted from its block lists, on every expert of every family."""
    for family, spec in SPECS.items():
        pipe = spec.build_tiny(0)
        tiny = config_reader(ModelConfig(family=family), spec)
        for expert in spec.experts:
            built = sum(len(getattr(getattr(pipe, expert), attr)) for attr in spec.block_lists)
            assert spec.block_count(tiny(f"{expert}/config.json")) == built > 0, (family, expert)


def test_wan_position_table_is_the_real_limit():
    """Tiny Wan: 512 pixels (32 latent patches) and 125 frames (32 latent frames) run; one patch
    or one latent frame more fails inside diffusers' RoPE: the plan's limit is exactly the model's."""
    spec = get_spec("wan")
    limits = spec.limits(config_reader(ModelConfig(family="wan"), spec))
    assert (limits.frames, limits.height) == (125, 512)
    transformer = spec.build_tiny(0).transformer
    text = torch.zeros(1, 4, 32)

    def forward(latent_frames: int, latent_height: int) -> None:
        x = torch.zeros(1, 16, latent_frames, latent_height, 2)
        with torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text)

    forward((125 - 1) // 4 + 1, 512 // 8)
    forward(1, 512 // 8)
    with pytest.raises(RuntimeError):
        forward(1, 528 // 8)
    with pytest.raises(RuntimeError):
        forward((129 - 1) // 4 + 1, 2)


def test_hunyuan_prompt_template_length():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from unison.engine.models.hunyuan_video.t2v import PROMPT_TEMPLATE_TOKENS

    assert DEFAULT_PROMPT_TEMPLATE["crop_start"] == PROMPT_TEMPLATE_TOKENS


# ---------------------------------------------------------------------------------------------
# Non-finite latents.

def test_finite_check_on_a_gpu_reads_the_flags_once():
    """The deferred path (any device but the CPU): no host read per step, the first bad step named
    at the end. Fed CPU tensors here; the logic is the device's."""
    check = FiniteCheck(torch.device("cuda"), 5)
    good, bad = torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0])
    for i, (latents, expert) in enumerate([(good, "transformer"), (good, "transformer"),
                                          (bad, "transformer_2"), (bad * 0 + float("inf"), "transformer_2"),
                                          (good, "transformer_2")]):
        check.after_step(i, latents, expert)  # never raises: nothing is read
    assert all(flag.dim() == 0 for flag in check.flags)
    with pytest.raises(NonFiniteLatents) as info:
        check.finish()
    assert (info.value.step, info.value.expert, info.value.steps) == (2, "transformer_2", 5)
    FiniteCheck(torch.device("cuda"), 1).finish()  # nothing queued: nothing to raise
    err = pickle.loads(pickle.dumps(info.value))  # Ray carries it from the rank actors
    assert (err.step, err.expert, str(err)) == (2, "transformer_2", str(info.value))
    # A step checkpoint reads the flags queued so far first: the bad step is still named by its index.
    check = FiniteCheck(torch.device("cuda"), 4)
    check.after_step(0, good, "transformer")
    check.after_step(1, good, "transformer")
    check.finish()  # the checkpoint after step 1: fine
    assert (check.flags, check.read) == ([], 2)
    check.after_step(2, good, "transformer")
    check.after_step(3, bad, "transformer_2")
    with pytest.raises(NonFiniteLatents) as info:
        check.finish()  # the checkpoint after step 3, or the end: never saved, never decoded
    assert (info.value.step, info.value.expert) == (3, "transformer_2")


def test_nan_latents_stop_the_render_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Wan 2.2 (two experts): a scheduler step that turns the latents NaN from step 3 on stops the
    render at step 3 on the CPU, names the low-noise expert, and writes nothing."""
    from diffusers import UniPCMultistepScheduler

    real = UniPCMultistepScheduler.step
    calls: list[int] = []

    def step(self, *args, **kwargs):
        calls.append(len(calls))
        out = real(self, *args, **kwargs)
        if len(calls) == 4:
            out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(UniPCMultistepScheduler, "step", step)
    video, latents = tmp_path / "v.mp4", tmp_path / "l.pt"
    code = main(["--set", "model.family=wan2.2", "--steps", "6", "--output", str(video),
                 "--save-latents", str(latents), "--set", "output.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("unison: error: ") and "\n" not in err
    assert "after step 3 " in err and "expert transformer_2" in err and "no video written" in err
    assert len(calls) == 4  # stopped at once, on the CPU
    assert list(tmp_path.iterdir()) == []


def test_batch_records_nan_latents_failed_without_retry(tmp_path, caplog):
    """Guidance 1e300 is finite (it passes validation) and overflows the first step: the job is
    failed after one attempt with --max-retries 2, no video, and the next job still renders."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "huge", "prompt": "a cat", "guidance": 1e300}\n{"id": "fine", "prompt": "a dog"}\n')
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", "2", "--max-retries", "2"]) == 1
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["attempts"]) for r in records] == [("huge", "failed", 1), ("fine", "done", 1)]
    assert records[0]["error"].startswith("NonFiniteLatents: the latents hold NaN or infinity after step 0 ")
    assert "expert transformer" in records[0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["fine.mp4", "fine.yaml", "manifest.jsonl"]
    assert "not retried" in caplog.text


# ---------------------------------------------------------------------------------------------
# Which errors a batch retries.

@pytest.mark.parametrize("error, again", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (MemoryError(), True),
    (OSError(28, "No space left on device"), True),
    (TimeoutError("collective timed out"), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (WriteFailed("the encoder failed"), True),
    (PeerFailed("rank 1 failed: DistBackendError: connection reset (rank 0 stopped because of it)"), True),
    (UserError("sampling.height=528 runs past the position table"), False),
    (NonFiniteLatents(0, 3, "transformer"), False),
    (CacheDisagreement("step 2: fbcache (cond) decisions disagree"), False),
    (ValueError("bad shape"), False),
    (TypeError("unexpected keyword"), False),
    (PeerFailed("rank 1 failed: NonFiniteLatents: the latents ... (rank 0 stopped because of it)"), False),
    (PeerFailed("rank 3 failed: UserError: bad value (rank 0 stopped because of it)"), False),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value))
def test_retry_classification(error, again):
    assert retryable(error) is again


def test_ray_errors_are_judged_by_the_rank_error_inside():
    """The Ray driver unwraps a rank's error from Ray's wrapper; a dead actor is retried."""
    ray = pytest.importorskip("ray")
    from unison.launch.ray_batch import _cause

    wrapped = ray.exceptions.RayTaskError("run", "traceback", NonFiniteLatents(1, 3, "transformer"))
    assert not retryable(_cause(wrapped)) and not retryable(_cause(wrapped.as_instanceof_cause()))
    assert retryable(_cause(ray.exceptions.RayActorError()))
