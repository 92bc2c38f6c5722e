"""model.offload: the text encoders visit the device only to encode, and only the running expert
of Wan 2.2 A14B is on the device; the render is unchanged.

On the CPU the compute device and the parking place are both the CPU, so the test parks on
`cpu:0` (a distinct torch.device that is still the CPU) and watches torch's own Module.to and
each module's forward: every forward must run while its module's last move was to the compute
device, and the idle expert must have left before the other one arrives."""

from __future__ import annotations

import torch

from unison.engine.config import ModelConfig, OutputConfig, RunConfig, SamplingConfig
from unison.engine.offload import Offloader
from unison.engine.render import Engine


def _config(offload: bool) -> RunConfig:
    return RunConfig(model=ModelConfig(family="wan2.2", offload=offload),
                     sampling=SamplingConfig(steps=4, frames=5), output=OutputConfig(decode=False, progress=False))


def test_offload_moves_idle_modules_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(Offloader, "park", torch.device("cpu", 0))
    reference = Engine.from_config(_config(False)).render().latents

    engine = Engine.from_config(_config(True))
    pipe = engine.pipe
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "transformer", "transformer_2")}
    where = {n: "cpu:0" if n in ("text_encoder", "transformer_2") else "cpu" for n in names.values()}
    log: list[tuple[str, str]] = []
    original_to = torch.nn.Module.to

    def spy_to(module, *args, **kwargs):
        if id(module) in names:
            device = torch.device(args[0] if args else kwargs["device"])
            where[names[id(module)]] = str(device)
            log.append(("to", names[id(module)], str(device)))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    for name in names.values():
        module = getattr(pipe, name)

        def pre(mod, args, kwargs, name=name):
            log.append(("forward", name, where[name]))
            # While a module runs it is on the compute device, and two experts never are at once.
            assert where[name] == "cpu", (name, where)
            assert not (where["transformer"] == where["transformer_2"] == "cpu"), where

        module.register_forward_pre_hook(pre, with_kwargs=True)

    for _ in range(2):  # a second video starts again from the high-noise expert
        latents = engine.render().latents
        assert torch.equal(latents, reference)
        assert where["text_encoder"] == "cpu:0"  # parked again after encoding
    forwards = [name for kind, name, _ in log if kind == "forward"]
    assert forwards.count("text_encoder") == 4  # cond + uncond, two videos
    experts = [n for n in forwards if n.startswith("transformer")]
    # 4 steps x 2 branches per video; the boundary splits the steps between the experts.
    assert len(experts) == 16 and experts[0] == "transformer" and "transformer_2" in experts
    switches = [(name, device) for kind, name, device in log if kind == "to" and name.startswith("transformer")]
    # per video: the first expert leaves before the second arrives (and back for the next video)
    assert switches[:2] == [("transformer", "cpu:0"), ("transformer_2", "cpu")]
