"""Real-size models on the meta device: parameter counts, FLOPs per forward and peak activation
bytes, from a component's config alone (no weights, no GPU, about 2 s per real-size forward).

The planner (engine/planner/layouts.py) asks three questions of a component:
- `parameters`: its parameters by part (the transformer blocks, everything else), counted from
  the module diffusers or transformers build from the config.
- `count_flops`: FLOPs of one transformer forward at a latent shape, counted by torch's
  FlopCounterMode while the real forward runs on meta tensors. On the meta device sdpa takes its
  math decomposition, whose two batched matmuls (scores, then weighted values) are the only
  `bmm`s these transformers run; projections and MLPs are `mm`/`addmm`. A test checks both
  sums against a hand count of a tiny Wan block.
- `peak_bytes`: the most bytes of tensors alive at once while a function runs on the meta
  device, followed storage by storage (weak references tell when one is freed). sdpa is stood in
  for by its output alone, as a fused kernel (flash, cuDNN, torch's CPU flash) never holds the
  score matrix; the planner adds the kernel's own workspace.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")
ATTENTION_OPS = ("aten.bmm", "aten._scaled_dot_product")
LINEAR_OPS = ("aten.mm", "aten.addmm")


def build(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The component's module with every parameter on the meta device (nothing allocated)."""
    import diffusers
    import transformers

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(META):
        if library == "diffusers":
            return getattr(diffusers, class_name)(**config).eval()
        cls = getattr(transformers, class_name)
        config_cls = cls.config_class
        # Text encoders saved by a pipeline name their config's model_type; drop what the
        # config class does not take as an argument only through **kwargs (it keeps the rest).
        return cls(config_cls(**config)).eval()


def parameters(module: torch.nn.Module, block_lists: tuple[str, ...] = ()) -> dict[str, int]:
    """Parameter counts: {"blocks": in the named block lists, "other": the rest}."""
    in_blocks = sum(p.numel() for name in block_lists for p in getattr(module, name).parameters())
    return {"blocks": in_blocks, "other": sum(p.numel() for p in module.parameters()) - in_blocks}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward (a multiply-add counts 2), as torch's FlopCounterMode counts them."""

    linear: int
    """Matrix multiplications of projections and MLPs (mm, addmm)."""
    attention: int
    """Scores and weighted values of every attention (sdpa, as its bmm pair)."""
    other: int
    """Everything else the counter knows (the patch-embedding convolution)."""
    blocks: int
    """The part of the total spent inside the transformer's block lists."""

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.other


def count_flops(module: torch.nn.Module, kwargs: dict[str, Any], *, block_lists: tuple[str, ...]) -> FlopCount:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        module(**kwargs)
    counts = counter.get_flop_counts()
    by_op = {str(op): n for op, n in counts["Global"].items()}
    root = type(module).__name__
    pattern = re.compile(rf"^{root}\.({'|'.join(block_lists)})\.\d+$")
    blocks = sum(sum(ops.values()) for name, ops in counts.items() if pattern.match(name))
    linear = sum(n for op, n in by_op.items() if op in LINEAR_OPS)
    attention = sum(n for op, n in by_op.items() if op.startswith(ATTENTION_OPS))
    return FlopCount(linear=linear, attention=attention, other=sum(by_op.values()) - linear - attention,
                     blocks=blocks)


class _OutputOnlyAttention(TorchFunctionMode):
    """sdpa returns an empty tensor of its output's shape: no score matrix, no compute."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args), **kwargs)
            query, value = named["query"], named["value"]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages operators allocate, alive at once: the running total and its peak."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def live(self) -> int:
        for key in [k for k, (ref, _) in self.storages.items() if ref.expired()]:
            del self.storages[key]  # forget freed storages, so each operator costs what is alive
        return sum(n for _, n in self.storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of an input (a transposed weight, a reshaped activation) allocates nothing.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.storages and storage._cdata not in inputs:
                    self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.live())
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Most bytes of tensors that `fn` allocates and holds at once (inputs and parameters
    excluded), on meta tensors, with sdpa as a fused kernel (its output only)."""
    tracker = _LiveBytes()
    with torch.no_grad(), _OutputOnlyAttention(), tracker:
        fn()
    return tracker.peak


COUNT_VERSION = 2
"""Part of every cache key: raise it when a change here changes what a count means."""


class CountCache:
    """Counts by key, kept in a JSON file so that a second `unison plan` skips the meta runs."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}  # a damaged cache is only a slower plan
            # Anything but an object of objects (a list, a number) is damaged too.
            self.data = {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    @staticmethod
    def key(*parts: Any) -> str:
        import diffusers

        text = json.dumps([COUNT_VERSION, torch.__version__, diffusers.__version__, *parts], sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.data:
            self.data[key] = compute()
            if self.path is not None:
                from unison.engine.io.writes import commit, text_write
                from unison.engine.errors import WriteFailed

                try:  # the verified write: its temporary goes whatever happens
                    commit(text_write(self.path, json.dumps(self.data)))
                except WriteFailed:
                    pass  # a read-only home: count again next time
        return self.data[key]


def flop_dict(count: FlopCount) -> dict:
    return asdict(count)


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers warns about dtype casts of modules built in-process; the meta models do that."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
