"""Component dtypes: cast as diffusers / transformers load, and say what each component holds.

`from_pretrained(dtype=...)` does not cast everything. It casts the tensors of the state dict
(parameters and persistent buffers), except the model's float32 islands, and leaves buffers
that are not saved (RoPE tables, Llama's inv_freq) as they were built, in float32. The islands:

- diffusers (`ModelMixin`): `_keep_in_fp32_modules` for any dtype, matched against the
  dot-separated parts of each tensor's name. Wan's transformer keeps its time embedder, its
  norms (norm1-3, the affine cross-attention norm), `scale_shift_table` and the RoPE in float32;
  HunyuanVideo's transformer has none.
- transformers (`PreTrainedModel`): `_keep_in_fp32_modules_strict` for float16 and bfloat16,
  `_keep_in_fp32_modules` for float16 only (umT5's `wo`), searched as patterns in the name.

`cast_component` applies the same rule to a module built in-process (the tiny presets,
`make-tiny --dtype`), so a preset cast here holds exactly what a folder loaded in that dtype holds.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, *, fallback: str | None = None) -> str:
    if name == "auto":
        if fallback is not None:
            return fallback
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def _is_transformers_model(cls: type) -> bool:
    from transformers import PreTrainedModel

    return issubclass(cls, PreTrainedModel)


def fp32_islands(model: Any, dtype: torch.dtype) -> tuple[str, ...]:
    """Names (a class's or a module's) that loading in `dtype` keeps in float32."""
    if dtype == torch.float32:
        return ()
    cls = model if isinstance(model, type) else type(model)
    if _is_transformers_model(cls):
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        return tuple(sorted(keep))
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def _in_island(name: str, islands: tuple[str, ...], *, transformers_rule: bool) -> bool:
    if transformers_rule:
        return any(re.search(k.replace("*", ".*"), name) for k in islands)
    parts = name.split(".")
    return any(k in parts for k in islands)


def cast_component(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `module` in place as `from_pretrained(dtype=dtype)` would load it (see the module doc)."""
    islands = fp32_islands(module, dtype)
    rule = _is_transformers_model(type(module))
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point():
                continue
            seen.add(id(param))
            full = f"{prefix}.{name}" if prefix else name
            param.data = param.data.to(torch.float32 if _in_island(full, islands, transformers_rule=rule) else dtype)
        for name, buf in list(sub._buffers.items()):
            if buf is None or not buf.is_floating_point() or name in sub._non_persistent_buffers_set:
                continue
            full = f"{prefix}.{name}" if prefix else name
            sub._buffers[name] = buf.to(torch.float32 if _in_island(full, islands, transformers_rule=rule) else dtype)


def describe_module(module: torch.nn.Module) -> str:
    """'bfloat16 on cuda:0', or 'bfloat16 (+float32 islands) on cuda:0' when some parameters
    keep another dtype; the main dtype is the one holding the most parameter elements."""
    counts: Counter = Counter()
    device = None
    for param in module.parameters():
        if param.is_floating_point():
            counts[param.dtype] += param.numel()
        if device is None:
            device = param.device
    if not counts:
        return f"no parameters on {device}"
    (main, _), *others = counts.most_common()
    text = str(main).removeprefix("torch.")
    extra = [str(d).removeprefix("torch.") for d, _ in others]
    if extra:
        text += " (+" + ", ".join(f"{d} islands" for d in extra) + ")"
    return f"{text} on {device}"


def class_has_fp32_islands(library: str | None, class_name: str | None, dtype: torch.dtype) -> bool:
    """Whether loading `library.class_name` in `dtype` keeps some tensors in float32 (False when
    the class is unknown). Imports the class only when `dtype` is not float32."""
    if dtype == torch.float32 or not library or not class_name:
        return False
    import importlib

    cls = getattr(importlib.import_module(library), class_name, None)
    return cls is not None and bool(fp32_islands(cls, dtype))


def describe_components(pipe, names: tuple[str, ...]) -> str:
    """'transformer bfloat16 (+float32 islands) on cuda:0, text_encoder bfloat16 on cuda:0, ...'
    for the components of `pipe` named in `names`, read from their parameters."""
    modules = [(name, getattr(pipe, name, None)) for name in names]
    return ", ".join(f"{name} {describe_module(m)}" for name, m in modules if isinstance(m, torch.nn.Module))
