"""Model families. A new family is one new module with a SPECS tuple, added to _MODULES."""

from __future__ import annotations

import json
from pathlib import Path

from unison.errors import UserError
from unison.engine.models import hunyuan_video, wan
from unison.engine.models.base import Conditioning, ModelSpec, SamplingDefaults

_MODULES = (wan, hunyuan_video)
SPECS: dict[str, ModelSpec] = {spec.family: spec for module in _MODULES for spec in module.SPECS}

__all__ = ["SPECS", "Conditioning", "ModelSpec", "SamplingDefaults", "get_spec", "read_model_index",
           "detect_family"]


def get_spec(family: str) -> ModelSpec:
    if family not in SPECS:
        raise UserError(f"unknown model family '{family}'; known: {', '.join(SPECS)}")
    return SPECS[family]


def read_model_index(path: str | Path) -> dict:
    """model_index.json of a local diffusers folder, or a UserError saying what is wrong."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"model path is not a folder: {folder}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index_file}: not valid JSON ({err})") from None


def detect_family(index: dict) -> str:
    for family, spec in SPECS.items():
        if spec.matches(index):
            return family
    raise UserError(
        f"unsupported pipeline '{index.get('_class_name')}'; supported: "
        + ", ".join(sorted({s.pipeline_class for s in SPECS.values()}))
    )
