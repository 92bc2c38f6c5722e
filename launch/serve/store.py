"""The service's job store: one folder (`unison serve --out DIR`), laid out as a batch folder.

    DIR/jobs/<id>.json      an accepted request (`Entry`), on disk before the response says so
    DIR/inputs/<id>.png     its picture, re-encoded by the server (the upload itself is not kept)
    DIR/<id>.mp4, <id>.yaml the video and its resolved config, as `unison batch` writes them
    DIR/<id>.thumb.jpg      the first frame, made when first asked for (and .sprites.jpg likewise)
    DIR/<id>.mp4.ckpt/      the render's step checkpoints while it runs
    DIR/manifest.jsonl      every attempt (launch/jobs.py): what is done, failed or to resume

A job exists while its jobs/<id>.json does: deleting one removes that file first (the delete is
then durable) and the rest after; what a crash leaves of a deleted job is swept at the next start.
Ids are made here (`video_` and 32 hex digits) and checked against that form before any path is
built from one, so no text from a request ever names a file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unison.engine.io.writes import bytes_write, commit

log = logging.getLogger("unison")

ID = re.compile(r"^video_[0-9a-f]{32}$")
THUMBNAIL = ".thumb.jpg"


def new_id() -> str:
    return "video_" + uuid.uuid4().hex


@dataclass(frozen=True)
class Entry:
    """An accepted job, as jobs/<id>.json holds it."""

    id: str
    created_at: int
    """Unix seconds."""
    seq: int
    """Order of acceptance (the queue's order, also after a restart)."""
    client: str
    """Who submitted it (the per-client limit counts by this)."""
    job: dict[str, Any]
    """The job as a batch line would give it (launch/jobs.py), its picture as inputs/<id>.png."""
    seconds: str
    """The clip's length as the API reports it."""
    size: str
    """WIDTHxHEIGHT as the API reports it."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)


class JobStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir).resolve()
        self.jobs = self.dir / "jobs"
        self.inputs = self.dir / "inputs"
        for folder in (self.dir, self.jobs, self.inputs):
            folder.mkdir(parents=True, exist_ok=True)

    # -- paths (only for ids of our own form) -------------------------------------------------
    def _checked(self, job_id: str) -> str:
        if not ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return job_id

    def video(self, job_id: str) -> Path:
        return self.dir / f"{self._checked(job_id)}.mp4"

    def thumbnail(self, job_id: str) -> Path:
        return self.dir / f"{self._checked(job_id)}{THUMBNAIL}"

    def picture(self, job_id: str) -> Path:
        return self.inputs / f"{self._checked(job_id)}.png"

    def _record(self, job_id: str) -> Path:
        return self.jobs / f"{self._checked(job_id)}.json"

    # -- accepting and reading ----------------------------------------------------------------
    def put_picture(self, job_id: str, png: bytes) -> Path:
        path = self.picture(job_id)
        commit(bytes_write(path, png))
        return path

    def accept(self, entry: Entry) -> None:
        """Write the entry durably (temporary, read back, fsync, rename, fsync the folder)."""
        commit(bytes_write(self._record(entry.id), entry.to_json().encode()))

    def entries(self) -> list[Entry]:
        """Every accepted job, in order of acceptance (an unreadable record is reported and left)."""
        out = []
        for path in self.jobs.glob("video_*.json"):
            if not ID.fullmatch(path.stem):
                continue
            try:
                entry = Entry(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.warning("unison serve: %s is no job record (%s); left as it is", path, err)
                continue
            out.append(entry)
        return sorted(out, key=lambda e: e.seq)

    # -- removing -----------------------------------------------------------------------------
    def remove(self, job_id: str, *, rendering: bool = False) -> None:
        """Delete a job: its record (durably), then what it made, unless it is `rendering`: its
        engine is still writing (checkpoints, the video), so that goes once the engine lets go
        of it (`leftovers`), or at the next start should the server die first."""
        self._record(job_id).unlink(missing_ok=True)
        _fsync_folder(self.jobs)
        if not rendering:
            self.leftovers(job_id)

    def leftovers(self, job_id: str) -> None:
        """Remove what a deleted job made or left (also once its engine has let go of it)."""
        for path in (self.video(job_id), self.video(job_id).with_suffix(".yaml"), self.thumbnail(job_id),
                     self.dir / f"{job_id}.sprites.jpg", self.picture(job_id)):
            path.unlink(missing_ok=True)
        for part in self.dir.glob(f".{job_id}.*.part*"):
            part.unlink(missing_ok=True)
        shutil.rmtree(self.dir / f"{job_id}.mp4.ckpt", ignore_errors=True)

    def sweep(self, keep: set[str]) -> int:
        """At start: remove what jobs no longer accepted left (a delete cut short by a crash, a
        picture whose request failed as the server died). Only names of our ids are looked at, so
        anything else in the folder is left alone. Returns how many jobs were swept."""
        gone = set()
        for path in [*self.dir.glob("video_*"), *self.inputs.glob("video_*")]:
            job_id = path.name.split(".")[0]
            if ID.fullmatch(job_id) and job_id not in keep:
                gone.add(job_id)
        for job_id in gone:
            self.leftovers(job_id)
        return len(gone)

    # -- the thumbnail ------------------------------------------------------------------------
    def make_thumbnail(self, job_id: str) -> Path | None:
        """The video's first frame as a JPEG beside it (None when the video cannot be read)."""
        from PIL import Image

        from unison.engine.io.video import video_frames
        from unison.engine.errors import UserError

        try:
            frame = next(iter(video_frames(self.video(job_id), what="the video")))
        except (UserError, StopIteration, OSError, RuntimeError) as err:
            log.warning("unison serve: no thumbnail for %s: %s", job_id, err)
            return None
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        path = self.thumbnail(job_id)
        commit(bytes_write(path, buffer.getvalue()))
        return path

    def spritesheet(self, job_id: str, *, tiles: int = 16, width: int = 160) -> Path | None:
        """Up to `tiles` frames spread over the video, each `width` pixels wide, in a grid of 4 a
        row (JPEG, beside the video; made once, on first request)."""
        from PIL import Image

        from unison.engine.io.video import video_frames, video_info
        from unison.engine.errors import UserError

        path = self.dir / f"{self._checked(job_id)}.sprites.jpg"
        if path.is_file():
            return path
        try:
            count = video_info(self.video(job_id), what="the video")[0]
            n = min(tiles, count)
            picks = {round(i * (count - 1) / max(1, n - 1)) for i in range(n)}
            frames = [Image.fromarray(f) for i, f in enumerate(video_frames(self.video(job_id), what="the video"))
                      if i in picks]
        except (UserError, OSError, RuntimeError) as err:
            log.warning("unison serve: no spritesheet for %s: %s", job_id, err)
            return None
        if not frames:
            return None
        height = max(1, round(width * frames[0].height / frames[0].width))
        columns = min(4, len(frames))
        rows = -(-len(frames) // columns)
        sheet = Image.new("RGB", (columns * width, rows * height))
        for i, frame in enumerate(frames):
            sheet.paste(frame.resize((width, height)), ((i % columns) * width, (i // columns) * height))
        buffer = io.BytesIO()
        sheet.save(buffer, format="JPEG", quality=85)
        commit(bytes_write(path, buffer.getvalue()))
        return path


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> int:
    return int(time.time())
