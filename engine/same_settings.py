"""Every rank of an engine runs the same settings, checked once the ranks have joined and before
anything loads.

Ranks started one by one (srun, Ray, by hand) can be given different flags. Different steps or
layouts would hang in a collective until the process-group timeout; a different seed or picture
would write a video that equals neither setting while the YAML beside it records rank 0's. So the
ranks exchange their resolved configs field by field (one all_gather_object) and a difference is
one line on every rank naming the first differing field and which ranks hold which value.

Compared: every field of the resolved config except those that may rightly differ per rank (the
model folder's path: nodes may hold copies at different paths, compared by content instead; the
device, which a rank may pin; progress display; the pictures' paths, whose SHA-256 the resolved
config records), plus the model folder's identity (a digest of its model_index.json and its
components' config.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch.distributed as dist

from unison.engine.config import RunConfig
from unison.engine.errors import UserError

PER_RANK = frozenset({"model.path", "model.device", "output.progress", "sampling.image", "sampling.last_image"})
"""Fields that may differ from rank to rank (the folder and the pictures are compared by content)."""


def model_identity(path: str | None) -> str:
    """A digest of the folder's model_index.json and every component's config.json (the
    weights are too large to hash at start; their configs name the architecture)."""
    if path is None:
        return "tiny preset"
    root = Path(path)
    digest = hashlib.sha256()
    for file in [root / "model_index.json", *sorted(root.glob("*/config.json"))]:
        if file.is_file():
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def settings(config: RunConfig) -> dict[str, str]:
    """The fields every rank must share, in the config's own order, each as text (a resolved
    config: plan_run has recorded the pictures' SHA-256)."""
    fields: dict[str, str] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if value is None or not dataclasses.is_dataclass(value):
            fields[section.name] = repr(value)
            continue
        for field in dataclasses.fields(value):
            key = f"{section.name}.{field.name}"
            if key not in PER_RANK:
                fields[key] = repr(getattr(value, field.name))
    fields["model folder (model_index.json and configs)"] = model_identity(config.model.path)
    return fields


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def first_difference(everyone: list[dict[str, str]]) -> str | None:
    """The first field on which the ranks' settings differ, as one line; None when they agree."""
    keys = list(dict.fromkeys(key for fields in everyone for key in fields))
    for key in keys:
        values = [fields.get(key, "(absent)") for fields in everyone]
        if len(set(values)) > 1:
            holders: dict[str, list[int]] = {}
            for rank, value in enumerate(values):
                holders.setdefault(value, []).append(rank)
            shown = "; ".join(f"{value[:80]} on {_ranks(ranks)}" for value, ranks in holders.items())
            return (f"the ranks were started with different settings: {key} is {shown}; start every rank "
                    f"with the same command, recipe, model and pictures")
    return None


def check_same_settings(config: RunConfig, *, group=None, world_size: int) -> None:
    """UserError on every rank when the ranks' settings differ (a collective over `group`)."""
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, settings(config), group=group)
    problem = first_difference(everyone)
    if problem:
        raise UserError(problem)
