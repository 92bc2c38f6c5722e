"""A create request (`POST /v1/videos`) -> a job object, as a batch line would give it.

OpenAI's Videos API fields: `prompt` (required), `model`, `size` ("WIDTHxHEIGHT"), `seconds`
and `input_reference` (a picture: an uploaded file, or `{"image_url": "data:image/...;base64,..."}`).
unison's own fields come beside them (the `openai` client's `extra_body`): `frames` (instead of
seconds), `seed`, `steps`, `guidance`, `negative_prompt` and the other sampling numbers, `cache` and
`cache_2` (a kind, or a mapping of a kind and its fields), and `lora` (names of the adapters the
server offers, `--adapter NAME=PATH`, each optionally `NAME:SCALE`; [] for none). A form (multipart,
what the `openai` client sends) carries every value as text; a JSON body carries typed values.

Anything unknown, malformed or out of range is a `BadRequest` (HTTP 400, or 413 for a picture too
large) raised before anything is written. What remains to check (frame counts the model takes,
sizes, cache fields) is the engine's own validation (`plan_run`), run by the caller on the result.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from unison.engine.config import SamplingConfig

OPENAI_FIELDS = ("prompt", "model", "size", "seconds", "input_reference")
NUMBERS = ("frames", "steps", "guidance", "guidance_2", "true_cfg_scale", "seed", "max_sequence_length",
           "flow_shift", "window_frames", "overlap_frames", "addnoise_condition", "ar_step", "causal_block_size")
"""Sampling numbers a request may set (each a field of SamplingConfig)."""
TEXTS = ("negative_prompt", "scheduler", "image_resize")
"""Sampling texts a request may set. No field that names a file is open to a request."""
OWN_FIELDS = (*NUMBERS, *TEXTS, "cache", "cache_2", "lora")
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP")


class BadRequest(Exception):
    """One JSON error: HTTP `status`, OpenAI's error `type` and `code`, the offending `param`."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str = "invalid_value", type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


@dataclass(frozen=True)
class Served:
    """What the server renders, as a request is checked against it."""

    model: str
    """The name clients see (`model` of every video) and may ask for."""
    aliases: tuple[str, ...]
    """Other names a request's `model` may give (the family)."""
    fps: int
    frames: int
    """The recipe's frame count (a request without seconds or frames gets it)."""
    width: int
    height: int
    adapters: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Name -> the lora entry ({path, scale, expert}) a request's `lora` may pick."""
    max_picture_side: int = 4096
    max_prompt_chars: int = 20000


@dataclass(frozen=True)
class Request:
    job: dict[str, Any]
    """The job object (no id, no picture path yet)."""
    picture: bytes | None
    """The picture re-encoded as PNG, or None."""
    seconds: str
    size: str


def _number(name: str, value: Any) -> int | float:
    """A form's text or a JSON number -> the field's type (int or float), finite."""
    hint = typing.get_type_hints(SamplingConfig)[name]
    want_int = int in typing.get_args(hint) or hint is int
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if want_int and re.fullmatch(r"[+-]?\d{1,30}", text) else float(text)
        except ValueError:
            raise BadRequest(f"'{name}' must be a number, got {value[:40]!r}", param=name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a finite number, got {str(value)[:40]}", param=name)
    if want_int:
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"'{name}' must be a whole number, got {value}", param=name)
        return int(value)
    return float(value)


def _json_or_text(name: str, value: Any) -> Any:
    """A form value that may be JSON (a mapping or a list), else the text itself."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            raise BadRequest(f"'{name}' is not valid JSON", param=name) from None
    return value


def _seconds_to_frames(value: Any, fps: int) -> tuple[int, str]:
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        raise BadRequest(f"'seconds' must be a number of seconds, got {text[:40]!r}", param="seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"'seconds' must be positive, got {text[:40]}", param="seconds")
    frames = seconds * fps
    if abs(frames - round(frames)) > 1e-6 or round(frames) > 100_000:
        raise BadRequest(f"'seconds' {text} is not a whole number of frames at {fps} fps; give seconds that are "
                         f"a multiple of 1/{fps}, or 'frames'", param="seconds")
    return round(frames) + 1, text


def _size(value: Any) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(value))
    if match is None:
        raise BadRequest(f"'size' must be WIDTHxHEIGHT (e.g. 832x480), got {str(value)[:40]!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def _loras(value: Any, served: Served) -> list[dict[str, Any]]:
    value = _json_or_text("lora", value)
    if isinstance(value, str):
        value = [item for item in (part.strip() for part in value.split(",")) if item]
    if not isinstance(value, list):
        value = [value]
    out = []
    for item in value:
        scale = None
        if isinstance(item, dict):
            name, scale = item.get("name"), item.get("scale")
            if set(item) - {"name", "scale"}:
                raise BadRequest("a 'lora' entry is a name or {name, scale}", param="lora")
        elif isinstance(item, str):
            name, _, scale_text = item.partition(":")
            scale = scale_text or None
        else:
            raise BadRequest("a 'lora' entry is a name or {name, scale}", param="lora")
        if name not in served.adapters:
            offered = ", ".join(sorted(served.adapters)) or "none (start the server with --adapter NAME=PATH)"
            raise BadRequest(f"no adapter named {str(name)[:60]!r} is served; offered: {offered}", param="lora")
        entry = dict(served.adapters[name])
        if scale is not None:
            try:
                entry["scale"] = float(scale)
            except (TypeError, ValueError):
                raise BadRequest(f"lora {name}: scale must be a number, got {str(scale)[:40]!r}",
                                 param="lora") from None
            if not math.isfinite(entry["scale"]):
                raise BadRequest(f"lora {name}: scale must be finite", param="lora")
        out.append(entry)
    return out


def picture_png(data: bytes, *, max_side: int) -> bytes:
    """An uploaded picture -> PNG bytes of it in RGB, or BadRequest: not a picture of an accepted
    format, or larger than `max_side` on a side (checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadRequest("'input_reference' holds more pixels than a picture may", param="input_reference",
                         status=413, code="picture_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadRequest("'input_reference' is not a picture (PNG, JPEG or WebP)", param="input_reference") from None
    if image.format not in PICTURE_FORMATS:
        raise BadRequest(f"'input_reference' is {image.format}; send PNG, JPEG or WebP", param="input_reference")
    width, height = image.size
    if max(width, height) > max_side or min(width, height) < 1:
        raise BadRequest(f"'input_reference' is {width}x{height}; at most {max_side} pixels a side",
                         param="input_reference", status=413, code="picture_too_large")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest("'input_reference' does not decode (a truncated or damaged file)",
                         param="input_reference") from None
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def data_url_bytes(url: Any) -> bytes:
    """`{"image_url": "data:image/png;base64,..."}`'s bytes; nothing is fetched from elsewhere."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("'input_reference.image_url' must be a data: URL (data:image/png;base64,...); the server "
                         "fetches nothing", param="input_reference")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise BadRequest("'input_reference.image_url' must be base64 (data:image/png;base64,...)",
                         param="input_reference")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'input_reference.image_url' is not valid base64", param="input_reference") from None


def parse_create(fields: dict[str, Any], upload: bytes | None, served: Served) -> Request:
    """The request's fields (form texts or JSON values) and uploaded picture -> a Request."""
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(OWN_FIELDS))
    if unknown:
        raise BadRequest(f"unknown parameter '{unknown[0][:60]}'; allowed: {', '.join(OPENAI_FIELDS + OWN_FIELDS)}",
                         param=unknown[0][:60], code="unknown_parameter")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' is required (a non-empty string)", param="prompt", code="missing_required_parameter")
    if len(prompt) > served.max_prompt_chars:
        raise BadRequest(f"'prompt' is {len(prompt)} characters; at most {served.max_prompt_chars}", param="prompt")
    model = fields.get("model")
    if model not in (None, "", served.model, *served.aliases):
        raise BadRequest(f"model {str(model)[:60]!r} is not served here; this server renders {served.model!r}",
                         param="model", code="model_not_found")
    job: dict[str, Any] = {"prompt": prompt}
    for name in TEXTS:
        if name in fields:
            if not isinstance(fields[name], str):
                raise BadRequest(f"'{name}' must be a string", param=name)
            job[name] = fields[name]
    for name in NUMBERS:
        if name in fields and fields[name] not in (None, ""):
            job[name] = _number(name, fields[name])
    if "seconds" in fields and "frames" in job:
        raise BadRequest("give 'seconds' or 'frames', not both", param="seconds")
    frames = job.get("frames", served.frames)
    seconds = None
    if fields.get("seconds") not in (None, ""):
        frames, seconds = _seconds_to_frames(fields["seconds"], served.fps)
        job["frames"] = frames
    width, height = (served.width, served.height)
    if fields.get("size") not in (None, ""):
        width, height = _size(fields["size"])
        job["width"], job["height"] = width, height
    for name in ("cache", "cache_2"):
        if fields.get(name) not in (None, ""):
            job[name] = _json_or_text(name, fields[name])
    if "lora" in fields:
        job["lora"] = _loras(fields["lora"], served)
    picture = None
    reference = fields.get("input_reference")
    if upload is not None and reference not in (None, ""):
        raise BadRequest("'input_reference' given twice", param="input_reference")
    if reference not in (None, ""):
        reference = _json_or_text("input_reference", reference)
        if not isinstance(reference, dict) or set(reference) - {"image_url", "file_id"}:
            raise BadRequest("'input_reference' is a file upload or {\"image_url\": DATA_URL}", param="input_reference")
        if "file_id" in reference:
            raise BadRequest("'input_reference.file_id': this server keeps no files API; upload the picture or send "
                             "a data: URL", param="input_reference")
        upload = data_url_bytes(reference.get("image_url"))
    if upload is not None:
        picture = picture_png(upload, max_side=served.max_picture_side)
    if seconds is None:
        seconds = f"{(frames - 1) / served.fps:g}"
    return Request(job=job, picture=picture, seconds=seconds, size=f"{width}x{height}")
