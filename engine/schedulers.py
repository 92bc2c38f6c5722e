"""The sampler: the folder's scheduler, or another diffusers flow-matching scheduler configured as
diffusers configures it for these models, with the flow shift the run asks for.

`sampling.scheduler` (`--scheduler`):
- default: the scheduler class and settings the model folder (or tiny preset) ships;
- unipc: UniPCMultistepScheduler with flow_prediction and flow sigmas (Wan's own default);
- dpm++: DPMSolverMultistepScheduler (dpmsolver++), flow_prediction and flow sigmas;
- deis: DEISMultistepScheduler, flow_prediction and flow sigmas;
- euler: FlowMatchEulerDiscreteScheduler (HunyuanVideo's own default).
Each starts from the folder scheduler's config (its train timesteps, its shift), so only what
makes it a flow-matching sampler is set. `sampling.flow_shift` (`--flow-shift`) replaces the shift
(`flow_shift` for UniPC, DPM++ and DEIS, `shift` for the Euler flow-matching scheduler); None keeps
the folder's. Wan's documented shifts: 3.0 at 480p, 5.0 at 720p (the recipes in configs/ set them).

HunyuanVideo's pipeline hands the scheduler explicit sigmas (1 → 1/steps), so only schedulers whose
`set_timesteps` takes sigmas are allowed there (`family_schedulers`); the others are refused before
anything loads, naming the allowed ones.
"""

from __future__ import annotations

import inspect

from unison.engine.errors import UserError

FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "unipc": ("UniPCMultistepScheduler", FLOW),
    "dpm++": ("DPMSolverMultistepScheduler", {**FLOW, "algorithm_type": "dpmsolver++"}),
    "deis": ("DEISMultistepScheduler", FLOW),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
"""sampling.scheduler (besides default) -> (diffusers class, what makes it flow matching)."""
NAMES = ("default", *SCHEDULERS)


def _class(name: str):
    import diffusers

    return getattr(diffusers, SCHEDULERS[name][0])


def takes_sigmas(name: str) -> bool:
    """Whether the scheduler's set_timesteps accepts explicit sigmas."""
    return "sigmas" in inspect.signature(_class(name).set_timesteps).parameters


def check(name: str, flow_shift: float | None, *, family: str, sigmas: bool) -> None:
    """UserError (one line) for a scheduler the family cannot take, or a bad shift."""
    if name not in NAMES:
        raise UserError(f"sampling.scheduler must be one of {', '.join(NAMES)}, got {name!r}")
    if sigmas and name != "default" and not takes_sigmas(name):
        allowed = ["default", *(n for n in SCHEDULERS if takes_sigmas(n))]
        raise UserError(f"sampling.scheduler: {family}'s pipeline passes sigmas, which {name} does not take; "
                        f"allowed: {', '.join(allowed)}")
    if flow_shift is not None and not flow_shift > 0:
        raise UserError(f"sampling.flow_shift must be positive, got {flow_shift}")


def check_sigmas(sigmas: tuple[float, ...], *, steps: int, scheduler: str) -> None:
    """UserError (one line) for sigmas the sampler cannot run: not one per step, not falling
    from at most 1 to above 0, or a sampler whose set_timesteps takes none. The folder's own
    sampler (default) is checked when it is built (`build`), its class being the folder's."""
    if not sigmas:
        raise UserError("sampling.sigmas must list at least one sigma (or be null)")
    if len(sigmas) != steps:
        raise UserError(f"sampling.sigmas lists {len(sigmas)} sigmas but sampling.steps is {steps}: one per step "
                        f"(leave steps out to take their count)")
    if not all(0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise UserError(f"sampling.sigmas must fall from at most 1 to above 0, one per step, got {list(sigmas)}")
    if scheduler != "default" and not takes_sigmas(scheduler):
        allowed = [n for n in SCHEDULERS if takes_sigmas(n)]
        raise UserError(f"sampling.sigmas: the {scheduler} sampler takes no sigmas; use {' or '.join(allowed)}")


def _shift_key(cls) -> str | None:
    params = inspect.signature(cls.__init__).parameters
    return "flow_shift" if "flow_shift" in params else "shift" if "shift" in params else None


def build(folder_class, folder_config, name: str, flow_shift: float | None):
    """A new scheduler: the folder's (class and config, never changed) as `name` with `flow_shift`."""
    if name == "default":
        cls, extra = folder_class, {}
    else:
        cls, extra = _class(name), dict(SCHEDULERS[name][1])
    if flow_shift is not None:
        key = _shift_key(cls)
        if key is None:
            raise UserError(f"sampling.flow_shift: {cls.__name__} has no flow shift")
        extra[key] = flow_shift
    return cls.from_config(folder_config, **extra)
