"""Batches of jobs: reading a JSONL file of prompts, and the manifest that makes a batch resumable.

A job is one line of JSON: `prompt` (required), `id` (optional), and per-job overrides of the
sampling fields (negative_prompt, seed, height, width, frames, steps, guidance, guidance_2,
true_cfg_scale, max_sequence_length) and of the cache (`"cache": "fbcache"`, or a mapping of a
kind and its own fields: `{"kind": "magcache", "threshold": 0.12}`; without a kind, fields of
the batch's kind), and on Wan 2.2 A14B of the low-noise expert's `cache_2`, written the same way.
Image-to-video jobs name their pictures (`image`, `last_image`); a relative path is resolved
against the JSONL file's folder, so a batch folder of prompts and pictures moves as one. `lora`
(a list of {path, scale, expert} or "PATH[:SCALE]" strings; [] for none) replaces the batch's
LoRAs for that job, its paths relative to the JSONL file's folder as pictures are; the engine
switches LoRAs between jobs without reloading (engine/lora.py).
Each line is validated completely (the same checks as `unison generate`, no weights read) before
anything renders; a line that does not parse or validate is reported with its number and skipped,
and the rest still render.

Output per job: DIR/<id>.mp4 and DIR/<id>.yaml, each read back and then renamed into place
(engine/io/writes.py). The manifest, DIR/manifest.jsonl, gets one JSON line per finished attempt, read
back and fsynced: status "done", "retry" (this attempt
failed; the job will run again) or "failed" (out of attempts, or at once for an error that the
same input brings back: a late UserError, NonFiniteLatents), with attempts, seconds and error.
It is the batch's record: re-running the same batch skips every job whose last record is done
(and whose video exists) or failed, and counts earlier attempts of the others.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from unison.caching import registry
from unison.engine.plan import plan_run
from unison.engine.config import SamplingConfig, RunConfig, config_from_dict, lora_from_text
from unison.engine.worker import Job
from unison.engine.io.writes import append_line
from unison.engine.errors import UserError

MANIFEST = "manifest.jsonl"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
"""Per-job keys that override the sampling section (prompt included)."""


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _shorten(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters (a message may quote a long value from the line)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def derived_id(obj: dict[str, Any]) -> str:
    """An id for a job without one: a hash of its content, so reordering lines keeps ids stable."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return "job-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def job_config(obj: dict[str, Any], *, base: RunConfig, out_dir: Path, job_id: str) -> RunConfig:
    """base <- the line's overrides <- output.path = out_dir/<id>.mp4 (UserError on a bad field)."""
    sampling = {k: v for k, v in obj.items() if k in SAMPLING_KEYS}
    nested: dict[str, dict] = {"sampling": sampling,
                               "output": {"path": str(out_dir / f"{job_id}.mp4"), "decode": True}}
    if "lora" in obj:
        nested["lora"] = obj["lora"]
    for section in ("cache", "cache_2"):
        cache = obj.get(section)
        if isinstance(cache, str):
            nested[section] = {"kind": cache}
        elif isinstance(cache, dict):
            nested[section] = cache
        elif cache is not None:
            raise UserError(f"{section}: expected a kind ({', '.join(registry.names())}) or a mapping of a kind "
                            f"and its fields, got {cache!r}")
    return config_from_dict(nested, base=base)


MAX_DEPTH = 8
"""A job is an object of plain values (and one cache mapping); deeper nesting is refused before
anything (repr, hashing an id) could recurse through it."""


def _not_json(name: str):
    raise UserError(f"{name} is not valid JSON (use a number or null)")


def _check_plain(obj: Any) -> None:
    """No nesting past MAX_DEPTH, and no text that cannot be written as UTF-8 (a lone surrogate
    such as "\\ud800" parses, then fails when the id is hashed or the config written)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise UserError(f"text holds a lone surrogate ({item[err.start]!r}), which is not writable "
                                f"as UTF-8") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise UserError(f"nested more than {MAX_DEPTH} levels deep; a job is an object of plain values")
            values = [*item, *item.values()] if isinstance(item, dict) else item
            stack.extend((value, depth + 1) for value in values)


IMAGE_KEYS = ("image", "last_image", "extend")
"""Per-job input paths (pictures, a video to extend), relative to the jobs file's folder."""


def parse_line(text: str, number: int, *, base: RunConfig, out_dir: Path, world_size: int,
               folder: Path | None = None, reads: dict[str, str] | None = None) -> Job:
    """One line -> a validated Job, or UserError saying what is wrong with it. `folder`: the jobs
    file's, against which relative picture paths are resolved (None: the working directory);
    `reads`: the command's input files (the recipe, the jobs file), which no job's output may replace."""
    try:
        obj = json.loads(text, parse_constant=_not_json)
    except UserError:
        raise
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise UserError("nested too deeply to read; a job is an object of plain values") from None
    except ValueError as err:  # an integer of thousands of digits
        raise UserError(f"not readable JSON ({str(err).splitlines()[0][:120]})") from None
    return parse_object(obj, number, base=base, out_dir=out_dir, world_size=world_size, folder=folder, reads=reads)


def parse_object(obj: Any, number: int, *, base: RunConfig, out_dir: Path, world_size: int,
                 folder: Path | None = None, reads: dict[str, str] | None = None) -> Job:
    """A job object (a parsed line, or a service's request) -> a validated Job, as parse_line."""
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}")
    _check_plain(obj)
    unknown = sorted(set(obj) - {"id", "cache", "cache_2", "lora", *SAMPLING_KEYS})
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}'; allowed: id, cache, cache_2, lora, {', '.join(SAMPLING_KEYS)}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise UserError("'prompt' is required (a non-empty string)")
    job_id = obj.get("id", derived_id(obj))
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise UserError(f"id must be 1-128 letters, digits, '.', '_' or '-' (not starting with one of "
                        f"the last three), got {job_id!r}")
    for key in IMAGE_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"'{key}' must be a path (a string), got {type(value).__name__}")
        if value is not None and folder is not None and not Path(value).is_absolute():
            obj = {**obj, key: str(folder / value)}
    if folder is not None and "lora" in obj:
        obj = {**obj, "lora": _relative_loras(obj["lora"], folder)}
    config = job_config(obj, base=base, out_dir=out_dir, job_id=job_id)
    config = plan_run(config, world_size=world_size, reads=reads).config
    return Job(id=job_id, line=number, config=config)


def _relative_loras(value: Any, folder: Path) -> Any:
    """A job's lora entries with relative paths resolved against the jobs file's folder (a value
    of another shape is left for the config's own error)."""
    def resolve(path: Any) -> Any:
        return str(folder / path) if isinstance(path, str) and path and not Path(path).is_absolute() else path

    items = value if isinstance(value, list) else [value]
    resolved = []
    for item in items:
        if isinstance(item, str):
            entry = lora_from_text(item)
            item = {"path": resolve(entry.path), "scale": entry.scale}
        elif isinstance(item, dict) and "path" in item:
            item = {**item, "path": resolve(item["path"])}
        resolved.append(item)
    return resolved if isinstance(value, list) else resolved[0]


def read_jobs(path: str | Path, *, base: RunConfig, out_dir: str | Path, world_size: int = 1,
              reads: dict[str, str] | None = None) -> tuple[list[Job], list[Problem]]:
    """Every valid job of the file, in order, and a Problem for every line skipped (a job whose
    video or YAML would replace the jobs file or a file in `reads` among them)."""
    path, out_dir = Path(path), Path(out_dir)
    if path.is_dir():
        raise UserError(f"jobs file is a folder: {path}")
    if not path.is_file():
        raise UserError(f"jobs file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    if b"\0" in data:
        raise UserError(f"{path}: not a text file (it holds NUL bytes: binary data, or UTF-16); a jobs file "
                        f"is UTF-8 text, one JSON object per line")
    jobs: list[Job] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    # Lines end at \n (or \r\n), as editors count them; str.splitlines would also split at
    # U+2028 and friends, which JSON allows inside a prompt.
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(number, f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"))
            continue
        if not text.strip():
            continue
        try:
            job = parse_line(text, number, base=base, out_dir=out_dir, world_size=world_size,
                             reads={**(reads or {}), "the jobs file": str(path)},
                             folder=path.resolve().parent)
        except UserError as err:
            problems.append(Problem(number, _shorten(str(err))))
            continue
        if job.id in seen:
            problems.append(Problem(number, f"duplicate id '{job.id}' (first on line {seen[job.id]})"))
            continue
        seen[job.id] = number
        jobs.append(job)
    return jobs, problems


# -- the manifest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    id: str
    status: str
    """done, retry, failed or preempted."""
    attempts: int
    seconds: float
    error: str | None = None
    steps: int = 0
    """Denoising steps this attempt finished (a failed or preempted one: as far as the driver knows)."""
    step_seconds: float = 0.0
    """Mean seconds per denoising step of this attempt (0 when it did not get that far)."""
    resumed_from_step: int = 0
    """The step this attempt started from: 0, or the step checkpoint it resumed from."""
    windows: int = 0
    """Diffusion forcing: windows finished when the attempt ended (done: all of them; stopped: as far
    as the driver knows, whose latents are kept with the step checkpoint and never recomputed)."""

    def to_json(self) -> str:
        record = dataclasses.asdict(self)
        if not record["windows"]:  # not diffusion forcing: the records of before
            del record["windows"]
        return json.dumps(record, ensure_ascii=False)


STATUSES = ("done", "retry", "failed", "preempted")


def _unreadable(raw: bytes) -> str:
    if b"\0" in raw:
        return "binary data"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text: byte {raw[err.start]:#04x} at column {err.start + 1}"
    return "not JSON"


def _fits(value: Any, tp: Any) -> bool:
    """Does a JSON value fit a Record field's annotation (str, int, float, None, or a union)?"""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    return True  # a kind of field these checks do not know: left to the code that reads it


def _parse_record(raw: bytes, *, where: str) -> Record | None:
    """A manifest line -> its Record; None when it is not UTF-8 JSON (a torn write, or garbage);
    a UserError when it is JSON but no valid record (edited by hand, or written by something else)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the stack
        return None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object (a record), got {type(obj).__name__}; "
                        f"fix or delete the line, or pick another --out")
    hints = typing.get_type_hints(Record)
    fields = {f.name: f for f in dataclasses.fields(Record)}
    problem = None
    unknown = sorted(set(obj) - set(fields))
    missing = [name for name, f in fields.items() if name not in obj
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown:
        problem = f"unknown key '{unknown[0]}'"
    elif missing:
        problem = f"missing '{missing[0]}'"
    else:
        wrong = next((name for name, value in obj.items() if not _fits(value, hints[name])), None)
        if wrong is not None:
            expected = getattr(hints[wrong], "__name__", str(hints[wrong]))
            problem = f"'{wrong}' should be {expected}, got {type(obj[wrong]).__name__} {obj[wrong]!r}"[:200]
        elif obj["status"] not in STATUSES:
            problem = f"status must be one of {', '.join(STATUSES)}, got {obj['status']!r}"[:200]
        elif obj["attempts"] < 1:
            problem = f"attempts must be at least 1, got {obj['attempts']}"
    if problem is not None:
        raise UserError(f"{where}: not a valid record ({problem}); fix or delete the line, or pick another --out")
    return Record(**obj)


def _after_torn_start(raw: bytes, *, where: str) -> Record | None:
    """The record a later append wrote onto a torn line (a crash mid-write leaves no newline):
    the first '{' from which the rest of the line is one valid record."""
    start = raw.find(b"{", 1)
    while start != -1:
        try:
            record = _parse_record(raw[start:], where=where)
        except UserError:
            record = None  # a '{' inside the torn part's text; try the next
        if record is not None:
            return record
        start = raw.find(b"{", start + 1)
    return None


class Manifest:
    """DIR/manifest.jsonl: appended one whole line per finished attempt (fsynced and read back; on
    failure WriteFailed, and the file as it was), read back to resume. A torn last line (a crash
    mid-write) is ignored."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST

    def records(self) -> list[Record]:
        """Every record, in order; a UserError (before anything renders) for a manifest that
        something else wrote. Torn writes are skipped: an unfinished last line, and the torn
        start of a line that the next run's append completed (its record is kept)."""
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise UserError(f"{self.path} is not a file (a folder?); a batch's manifest is a JSON-lines file: "
                            f"move it away or pick another --out")
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise UserError(f"{self.path}: cannot read ({err.strerror or err})") from None
        lines = data.split(b"\n")
        out = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            record = _parse_record(raw, where=f"{self.path} line {number}")
            if record is None:
                record = _after_torn_start(raw, where=f"{self.path} line {number}")
            if record is not None:
                out.append(record)
            elif number < len(lines) or raw.lstrip(b"\0")[:1] not in (b"", b"{"):
                # A finished line (or a tail that is no record's start: not JSON at all) is no
                # torn write of ours.
                raise UserError(f"{self.path} line {number}: not a manifest record ({_unreadable(raw)}); "
                                f"fix or delete the line, or pick another --out")
        return out

    def append(self, record: Record) -> None:
        append_line(self.path, record.to_json())


@dataclass(frozen=True)
class Resume:
    todo: list[Job]
    """Jobs still to render, in file order."""
    finished: dict[str, str]
    """id -> done or failed, for jobs this run skips."""
    attempts: dict[str, int]
    """Attempts already made (retry records; a preempted attempt is not counted) per job still to
    render."""
    history: dict[str, list[Record]] = dataclasses.field(default_factory=dict)
    """Earlier runs' records of the jobs still to render (steps they computed count as recomputed)."""


def resume(jobs: Iterable[Job], manifest: Manifest) -> Resume:
    """Which jobs remain: a job is finished when its last record is failed, or done with its video
    on disk (a video deleted by hand is rendered again)."""
    records = manifest.records()
    last = {record.id: record for record in records}
    todo, finished = [], {}
    for job in jobs:
        record = last.get(job.id)
        if record is not None and (record.status == "failed" or
                                   record.status == "done" and Path(job.config.output.path).is_file()):
            finished[job.id] = record.status
        else:
            todo.append(job)
    history: dict[str, list[Record]] = {}
    for record in records:
        history.setdefault(record.id, []).append(record)
    return Resume(todo=todo, finished=finished,
                  attempts={j.id: last[j.id].attempts - (last[j.id].status == "preempted") for j in todo
                            if j.id in last and last[j.id].status in ("retry", "preempted")},
                  history={j.id: history[j.id] for j in todo if j.id in history})


def recomputed(records: Iterable[Record]) -> int:
    """Steps computed again because an attempt stopped (a fault or a preemption): per job, the steps
    every attempt finished, less the furthest step any of them reached. A render that resumes from
    the step it stopped at recomputes nothing; one that starts over recomputes all it had done."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for record in records:
        spans.setdefault(record.id, []).append((record.resumed_from_step, record.steps))
    return sum(sum(n for _, n in s) - max(first + n for first, n in s) for s in spans.values())


def clean_partial_files(out_dir: str | Path) -> int:
    """Remove temporary files a killed render left behind (.<id>.*.part.mp4 / .yaml); returns how many."""
    removed = 0
    for path in Path(out_dir).glob(".*.part.*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
