"""No host synchronisation inside the transformer blocks under any parallel mode (both families).

A read of a tensor's value on the host (`.item()`, `.tolist()`, `bool`/`float`/`int` of a tensor,
a Python `if` on one, `.cpu()`, `.numpy()`, data-dependent shapes such as `nonzero`) waits for the
GPU to finish everything queued: inside the blocks it stalls every layer. Here a TorchFunctionMode
records any such call made while a block list's module runs (its hooks, the cache wrappers and
every block below it, PipeFusion's StageRunner included), in one two-rank run, eager, nine mode
and family pairs with both caches. The one designed host read is allowed: a data-dependent cache
decision needs the agreed ratio on the host once per step and branch (caching/agree.py
`Agreement`, called by First-Block Cache between the first block and the others, outside the
compiled block forwards).
The text length HunyuanVideo's joint attention slices by is read in a pre-hook of the whole
transformer, once per prompt mask (engine/models/hunyuan_video/parallel.py TextLengths), outside the blocks.

A control in the same run puts an `.item()` into Wan's sequence-parallel processor and checks
that the guard sees it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from multirank import run_ranks
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig

_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
          torch.Tensor.nonzero, torch.nonzero, torch.Tensor.equal, torch.equal, torch.masked_select,
          torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.Tensor.__array__}


def _to_host(func, args, kwargs) -> bool:
    """`.to("cpu")`: a copy to the host. (Only the literal: on this CPU-only machine every
    `x.to(y.device)`, device-agnostic code that stays on the GPU there, names the CPU too.)"""
    return func is torch.Tensor.to and any(isinstance(t, str) and t == "cpu" for t in (*args[1:], kwargs.get("device")))


class HostSyncs(TorchFunctionMode):
    """Records every host read made inside the watched modules' calls, as (label, function name)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.ops: Counter = Counter()
        """Torch calls seen per label: the guard was on."""
        self.label = ""
        self.depth = 0
        self.allowed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[self.label] += 1
        if not self.allowed and (func in _SYNCS or _to_host(func, args, kwargs)):
            self.calls.append((self.label, getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def allow(self):
        self.allowed += 1
        try:
            yield
        finally:
            self.allowed -= 1

    def watch(self, modules) -> None:
        """Active from before the modules' first pre-hook to after their last hook (nested calls,
        PipeFusion's blocks inside its StageRunner, count once)."""
        def enter(module, args):
            self.depth += 1
            if self.depth == 1:
                self.__enter__()

        def leave(module, args, output):
            self.depth -= 1
            if self.depth == 0:
                self.__exit__(None, None, None)

        for module in modules:
            module.register_forward_pre_hook(enter, prepend=True)
            module.register_forward_hook(leave, always_call=True)


def _config(family: str, cache: CacheConfig, **parallel) -> RunConfig:
    hunyuan = family == "hunyuanvideo"
    return RunConfig(
        model=ModelConfig(family=family), cache=cache,
        sampling=SamplingConfig(height=32, width=32, frames=5, steps=2, negative_prompt="blurred",
                                true_cfg_scale=3.0 if hunyuan else None, max_sequence_length=64 if hunyuan else None),
        # One warm-up step: the second step runs the displaced / pipelined path.
        parallel=ParallelConfig(timeout_s=120, patch_warmup_steps=1, **parallel),
        output=OutputConfig(decode=False, progress=False))


FBCACHE = CacheConfig(kind="fbcache", threshold=0.2)
PAB = CacheConfig(kind="pab", self_skip_range=2, self_timestep_min=0, self_timestep_max=2000,
                  cross_skip_range=2, cross_timestep_min=0, cross_timestep_max=2000)
NONE = CacheConfig()
MAGCACHE = CacheConfig(kind="magcache", mag_ratios=(1.0, 0.99), threshold=0.05, retention_ratio=0.0)
MODES = [
    ("wan", FBCACHE, dict(ulysses=2)),
    ("wan", MAGCACHE, dict(ulysses=2)),
    ("hunyuanvideo", MAGCACHE, dict(cfg=2)),
    ("wan", PAB, dict(ring=2)),
    ("wan", FBCACHE, dict(cfg=2)),
    ("wan", FBCACHE, dict(patch=2)),
    ("wan", FBCACHE, dict(patch=2, patch_mode="pipefusion")),
    ("hunyuanvideo", FBCACHE, dict(ulysses=2)),
    ("hunyuanvideo", NONE, dict(ring=2)),
    ("hunyuanvideo", PAB, dict(patch=2)),
    ("hunyuanvideo", FBCACHE, dict(patch=2, patch_mode="pipefusion")),
]


def _watched_renders(rank: int, world: int) -> dict:
    from unison.caching.agree import Agreement

    syncs = HostSyncs()
    # The designed host read of a data-dependent cache decision is allowed. (The ranks are pooled
    # processes that later tests use: every patch is undone.)
    saved = {name: getattr(Agreement, name) for name in ("ratio", "check")}
    for name, method in saved.items():
        setattr(Agreement, name, lambda self, *a, _method=method, **k: _allowed(syncs, _method, self, *a, **k))
    try:
        return _renders(world, syncs)
    finally:
        for name, method in saved.items():
            setattr(Agreement, name, method)


def _renders(world: int, syncs: HostSyncs) -> dict:
    from unison.engine.models.wan.parallel import WanSelfAttention
    from unison.engine.render import Engine

    found, skipped = {}, {}
    for family, cache, parallel in MODES:
        label = f"{family} {cache.kind} " + " ".join(f"{k}={v}" for k, v in parallel.items())
        engine = Engine.from_config(_config(family, cache, **parallel), world_size=world)
        transformer = engine.pipe.transformer
        syncs.label = label
        syncs.watch(module for attr in engine.plan.spec.block_lists for module in getattr(transformer, attr))
        result = engine.render()
        found[label] = [name for at, name in syncs.calls if at == label]
        skipped[label] = sum(not d[-1] for d in result.cache_decisions.get("transformer", []))
        if label == "wan fbcache ulysses=2":
            control = engine
    # The control: an .item() in the sequence-parallel processor is seen.
    call = WanSelfAttention.__call__
    WanSelfAttention.__call__ = lambda self, attn, hidden_states, *a, **k: (
        hidden_states.abs().max().item(), call(self, attn, hidden_states, *a, **k))[1]
    try:
        syncs.label = "control"
        control.render(dataclasses.replace(control.plan.config, cache=NONE))
    finally:
        WanSelfAttention.__call__ = call
    return dict(found=found, skipped=skipped, ops=dict(syncs.ops),
                control=[name for at, name in syncs.calls if at == "control"])


def _allowed(syncs: HostSyncs, method, *args, **kwargs):
    with syncs.allow():
        return method(*args, **kwargs)


def test_no_host_sync_inside_blocks():
    for result in run_ranks(2, _watched_renders):
        assert result["found"] == {label: [] for label in result["found"]}
        assert all(result["ops"].get(label, 0) > 100 for label in result["found"]), result["ops"]
        # The caches did skip work somewhere (so their skip paths ran under the guard too).
        assert any(result["skipped"].values())
        # 2 steps x 2 branches x 3 blocks: every self-attention call of the control render.
        assert result["control"] == ["item"] * 12


def test_text_length_read_once_per_mask(monkeypatch):
    """HunyuanVideo's text length reaches the host once per prompt mask (the loop passes the same
    mask to every step of a branch), again only if the mask is a new tensor or changed in place."""
    from unison.engine.models.hunyuan_video.parallel import TextLengths

    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    lengths = TextLengths()
    cond, uncond = torch.tensor([[1.0, 1, 1, 0, 0]]), torch.tensor([[1.0, 1, 0, 0, 0]])
    assert [lengths(m) for m in (cond, uncond) * 3] == [3, 2] * 3
    assert len(reads) == 2
    cond[0, 3] = 1
    assert lengths(cond) == 4 and lengths(cond.clone()) == 4 and len(reads) == 4
