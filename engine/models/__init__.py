"""Model families: one folder each (engine/models/<family>/, with its SPECS), listed once below.

- spec: ModelSpec (a family's data), Hooks (the loop's calls into it), Checkpoint (a published
  checkpoint), Limits, Conditioning
- tiny: the offline tokenizers the tiny presets share
- wan/, hunyuan_video/, skyreels_v2/, hunyuan_video15/: the families
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unison.engine.errors import UserError
from unison.engine.models import hunyuan_video, hunyuan_video15, skyreels_v2, wan
from unison.engine.models.spec import Checkpoint, Conditioning, Hooks, ModelSpec, SamplingDefaults

FAMILIES = (wan, hunyuan_video, skyreels_v2, hunyuan_video15)
"""The family folders: adding a family is its folder and one entry here."""
SPECS: dict[str, ModelSpec] = {spec.family: spec for family in FAMILIES for spec in family.SPECS}

__all__ = ["SPECS", "Checkpoint", "Conditioning", "Hooks", "ModelSpec", "SamplingDefaults", "checkpoints", "get_spec",
           "read_model_index", "read_json", "detect_family"]


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
    index = read_json(index_file)
    if not isinstance(index, dict):
        raise UserError(f"{index_file}: expected a JSON object, got {type(index).__name__}")
    if not isinstance(index.get("_class_name"), str):
        raise UserError(f"{index_file}: '_class_name' must name the pipeline class, got {index.get('_class_name')!r}")
    for name, entry in index.items():
        # Components are [library, class] pairs ([null, null] when absent); other keys are
        # pipeline config values (Wan 2.2's boundary_ratio, ...).
        if isinstance(entry, list) and not (len(entry) == 2 and all(v is None or isinstance(v, str) for v in entry)):
            raise UserError(f"{index_file}: component '{name}' must be [library, class], got {entry!r}"[:300])
    return index


def read_json(path: Path) -> Any:
    """A small JSON file (model_index.json, a component's config.json), or a one-line UserError:
    unreadable, not UTF-8, not JSON, or nested too deeply to parse."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits; nesting past the stack
        raise UserError(f"{path}: not readable JSON ({str(err).splitlines()[0][:120]})") from None


def detect_family(index: dict) -> str:
    for family, spec in SPECS.items():
        if spec.matches(index):
            return family
    raise UserError(
        f"unsupported pipeline '{index.get('_class_name')}'; supported: "
        + ", ".join(sorted({s.pipeline_class for s in SPECS.values()}))
    )


def checkpoints() -> dict[str, tuple[ModelSpec, Checkpoint]]:
    """Every family's published checkpoints by name (for `unison plan --family` and the presets)."""
    return {c.name: (spec, c) for spec in SPECS.values() for c in spec.checkpoints}
