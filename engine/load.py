"""Load a planned run's pipeline: the tiny preset built in-process or a local diffusers folder,
each component in its dtype and on its device (idle ones parked under model.offload), and the
attention kernel diffusers' own processors use."""

from __future__ import annotations

import torch

from unison.engine.errors import UserError
from unison.engine.offload import offloader_for
from unison.engine.plan import Plan
from unison.engine.precision import DTYPES, cast_component


def use_attention_backend(pipe, plan: Plan) -> None:
    """parallel.attention_backend for the attention diffusers' own processors run (all of it on
    one rank; cross-attention under sequence parallelism, whose processors take the backend from
    the engine's AttentionGroups)."""
    from unison.parallel.attention import diffusers_backend

    name = diffusers_backend(plan.config.parallel.attention_backend, device=plan.device,
                             dtype=DTYPES[plan.config.model.dtype])
    if name is not None:
        for expert in plan.spec.experts:
            getattr(pipe, expert).set_attention_backend(name)


def load_pipeline(plan: Plan):
    """Build the diffusers pipeline: the tiny preset in-process, or a local folder."""
    import diffusers

    model = plan.config.model
    dtype, vae_dtype = DTYPES[model.dtype], DTYPES[model.vae_dtype]
    if plan.is_tiny:
        pipe = plan.spec.build_tiny(model.tiny_seed)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                cast_component(component, torch.float32 if name == "image_encoder" else
                               vae_dtype if name == "vae" else dtype)
    else:
        cls = getattr(diffusers, plan.spec.pipeline_class)
        try:
            # Wan 2.1 I2V's CLIP image encoder in float32, as diffusers' example loads it.
            pipe = cls.from_pretrained(model.path, dtype={"default": dtype, "vae": vae_dtype,
                                                          "image_encoder": torch.float32})
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load {model.path}: {str(err).splitlines()[0]}") from None
    # With model.offload the idle modules stay on the CPU (engine/offload.py moves them in when needed).
    offloader = offloader_for(plan, pipe)
    idle = offloader.idle()
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()  # modules built in-process start in training mode (dropout on)
            # Inference only. Beyond memory: with parameters that require grad, a forward outside
            # torch.no_grad (prompt encoding) records a graph, and sdpa then picks another kernel
            # than diffusers' no_grad __call__ does, which shows in bfloat16.
            component.requires_grad_(False)
            component.to(offloader.park if name in idle else plan.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
