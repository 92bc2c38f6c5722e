"""GPU-only checks (`pytest -m gpu` on a GPU machine; skipped elsewhere, see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from unison.engine.config import ModelConfig, OutputConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine

pytestmark = pytest.mark.gpu


def _config(**model) -> RunConfig:
    return RunConfig(model=ModelConfig(family=model.pop("family", "wan"), device="cuda", **model),
                     sampling=SamplingConfig(steps=3, frames=5), output=OutputConfig(decode=False, progress=False))


def test_the_loop_never_synchronizes_the_device(monkeypatch):
    """Steps are timed with events on the compute stream; a device-wide synchronize would also
    wait for the communication streams and shorten the overlap of asynchronous exchanges."""
    engine = Engine.from_config(_config())
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(a), real(*a, **k)))
    result = engine.render()
    assert calls == []
    assert len(result.loop.steps) == 3 and all(r.seconds > 0 for r in result.loop.steps)


def test_default_dtype_on_a_gpu_is_bfloat16_with_a_float32_vae():
    engine = Engine.from_config(_config())
    assert engine.pipe.transformer.proj_out.weight.dtype == torch.bfloat16
    assert engine.pipe.text_encoder.dtype == torch.bfloat16
    assert next(engine.pipe.vae.parameters()).dtype == torch.float32
    assert engine.pipe.transformer.proj_out.weight.device.type == "cuda"


def test_offload_keeps_idle_modules_on_the_cpu_and_lowers_the_peak():
    off = Engine.from_config(_config(family="wan2.2"))
    reference = off.render()
    del off
    torch.cuda.empty_cache()
    on = Engine.from_config(_config(family="wan2.2", offload=True))
    result = on.render()
    assert next(on.pipe.text_encoder.parameters()).device.type == "cpu"
    assert next(on.pipe.transformer.parameters()).device.type == "cpu"  # the low-noise expert ran last
    assert next(on.pipe.transformer_2.parameters()).device.type == "cuda"
    assert result.peak_memory_bytes < reference.peak_memory_bytes
    assert torch.equal(result.latents, reference.latents)
