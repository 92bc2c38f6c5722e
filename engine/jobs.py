"""Batches of jobs: reading a JSONL file of prompts, and the manifest that makes a batch resumable.

A job is one line of JSON: `prompt` (required), `id` (optional), and per-job overrides of the
sampling fields (negative_prompt, seed, height, width, frames, steps, guidance, guidance_2,
true_cfg_scale, max_sequence_length) and of the cache (`"cache": "fbcache"` or a mapping of
cache fields). Each line is validated completely (the same checks as `unison generate`, no
weights read) before anything renders; a line that does not parse or validate is reported with
its number and skipped, and the rest still render.

Output per job: DIR/<id>.mp4 and DIR/<id>.yaml, each written atomically. The manifest,
DIR/manifest.jsonl, gets one JSON line per finished attempt: status "done", "retry" (this attempt
failed; the job will run again) or "failed" (out of attempts), with attempts, seconds and error.
It is the batch's record: re-running the same batch skips every job whose last record is done
(and whose video exists) or failed, and counts earlier attempts of the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from unison.engine.build import plan_run
from unison.engine.config import SamplingConfig, RunConfig, config_from_dict
from unison.errors import UserError

MANIFEST = "manifest.jsonl"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
"""Per-job keys that override the sampling section (prompt included)."""


@dataclass(frozen=True)
class Job:
    id: str
    line: int
    """1-based line number in the jobs file."""
    config: RunConfig
    """The whole resolved config for this job; output.path is DIR/<id>.mp4."""


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def derived_id(obj: dict[str, Any]) -> str:
    """An id for a job without one: a hash of its content, so reordering lines keeps ids stable."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return "job-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def job_config(obj: dict[str, Any], *, base: RunConfig, out_dir: Path, job_id: str) -> RunConfig:
    """base <- the line's overrides <- output.path = out_dir/<id>.mp4 (UserError on a bad field)."""
    sampling = {k: v for k, v in obj.items() if k in SAMPLING_KEYS}
    nested: dict[str, dict] = {"sampling": sampling,
                               "output": {"path": str(out_dir / f"{job_id}.mp4"), "decode": True}}
    cache = obj.get("cache")
    if isinstance(cache, str):
        nested["cache"] = {"kind": cache}
    elif isinstance(cache, dict):
        nested["cache"] = cache
    elif cache is not None:
        raise UserError(f"cache: expected a kind (none, fbcache, pab) or a mapping of cache fields, got {cache!r}")
    return config_from_dict(nested, base=base)


def parse_line(text: str, number: int, *, base: RunConfig, out_dir: Path, world_size: int) -> Job:
    """One line -> a validated Job, or UserError saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"id", "cache", *SAMPLING_KEYS})
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}'; allowed: id, cache, {', '.join(SAMPLING_KEYS)}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise UserError("'prompt' is required (a non-empty string)")
    job_id = obj.get("id", derived_id(obj))
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise UserError(f"id must be 1-128 letters, digits, '.', '_' or '-' (not starting with one of "
                        f"the last three), got {job_id!r}")
    config = job_config(obj, base=base, out_dir=out_dir, job_id=job_id)
    config = plan_run(config, world_size=world_size).config
    return Job(id=job_id, line=number, config=config)


def read_jobs(path: str | Path, *, base: RunConfig, out_dir: str | Path,
              world_size: int = 1) -> tuple[list[Job], list[Problem]]:
    """Every valid job of the file, in order, and a Problem for every line skipped."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise UserError(f"jobs file not found: {path}")
    jobs: list[Job] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            job = parse_line(text, number, base=base, out_dir=out_dir, world_size=world_size)
        except UserError as err:
            problems.append(Problem(number, str(err)))
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
    """done, retry or failed."""
    attempts: int
    seconds: float
    error: str | None = None
    steps: int = 0
    step_seconds: float = 0.0
    """Mean seconds per denoising step of this attempt (0 when it did not get that far)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


class Manifest:
    """DIR/manifest.jsonl: appended one whole line per finished attempt (flushed and fsynced),
    read back to resume. A torn last line (a crash mid-write) is ignored."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST

    def records(self) -> list[Record]:
        if not self.path.is_file():
            return []
        out = []
        for text in self.path.read_text().splitlines():
            try:
                out.append(Record(**json.loads(text)))
            except (json.JSONDecodeError, TypeError):
                continue
        return out

    def append(self, record: Record) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class Resume:
    todo: list[Job]
    """Jobs still to render, in file order."""
    finished: dict[str, str]
    """id -> done or failed, for jobs this run skips."""
    attempts: dict[str, int]
    """Attempts already made (retry records) per job still to render."""


def resume(jobs: Iterable[Job], manifest: Manifest) -> Resume:
    """Which jobs remain: a job is finished when its last record is failed, or done with its video
    on disk (a video deleted by hand is rendered again)."""
    last = {record.id: record for record in manifest.records()}
    todo, finished = [], {}
    for job in jobs:
        record = last.get(job.id)
        if record is not None and (record.status == "failed" or
                                   record.status == "done" and Path(job.config.output.path).is_file()):
            finished[job.id] = record.status
        else:
            todo.append(job)
    return Resume(todo=todo, finished=finished,
                  attempts={j.id: last[j.id].attempts for j in todo if j.id in last and last[j.id].status == "retry"})


def clean_partial_files(out_dir: str | Path) -> int:
    """Remove temporary files a killed render left behind (.<id>.*.part.mp4 / .yaml); returns how many."""
    removed = 0
    for path in Path(out_dir).glob(".*.part.*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
