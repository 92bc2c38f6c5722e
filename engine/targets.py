"""Where a run's writes land, checked before anything loads: every file a command writes (video,
its YAML, latents, the checkpoint folder, a calibrated recipe, a batch's folder) can be written,
lands on no other output, on nothing the run reads (the model folder, the input recipe, the
pictures) and inside no model folder; a checkpoint folder is new, empty or one unison made.

unison removes only what it created and can recognise: a checkpoint folder it made carries a
marker file (engine/io/checkpoint.py writes it before the first checkpoint), and its files have
unison's names.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from unison.engine.config import OutputConfig, RunConfig
from unison.engine.errors import UserError

MAX_FPS = 1000
"""Frame rates above this are no video anyone plays (and 2**70 made the encoder write nothing)."""

CHECKPOINT_MARKER = "unison-checkpoints.txt"
"""The file that marks a checkpoint folder as unison's."""
CHECKPOINT_NAMES = re.compile(r"rank\d+\.(step|window)\d+\.pt|manifest\.json|unison-checkpoints\.txt"
                              r"|\.(rank\d+\.(step|window)\d+|manifest|unison-checkpoints)\.[a-z0-9_]{8}\.part\.(pt|json|txt)")
"""Every name unison writes in a checkpoint folder (checkpoints, manifest, marker, and the
temporaries engine/io/writes.py names `.<stem>.<random>.part<suffix>`)."""


def checkpoint_folder(output: OutputConfig) -> Path:
    """output.checkpoint_dir, or `<video>.ckpt/` beside the video."""
    return Path(output.checkpoint_dir) if output.checkpoint_dir else Path(output.path + ".ckpt")


def is_ours(folder: Path) -> bool:
    """A checkpoint folder unison made: its marker, or (written before markers existed) nothing
    but unison's names with at least one checkpoint among them."""
    names = os.listdir(folder)
    if CHECKPOINT_MARKER in names:
        return True
    return all(CHECKPOINT_NAMES.fullmatch(n) for n in names) and any(n.startswith("rank") for n in names)


def picture_reads(sampling) -> dict[str, str]:
    """The pictures a run reads (sampling.image, sampling.last_image), as `reads` for check_landings."""
    return {f"sampling.{name}": getattr(sampling, name) for name in ("image", "last_image", "extend")
            if getattr(sampling, name)}


def check_writable(path: str | Path, *, what: str, suffix: str | None = None) -> None:
    target = Path(path)
    if suffix and target.suffix.lower() != suffix:
        raise UserError(f"{what} must end with {suffix}: {path}")
    if target.is_dir():
        raise UserError(f"{what} is a folder, not a file: {path}")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} cannot be written: {ancestor} is not a folder ({path})")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} cannot be written: no write permission in {ancestor} ({path})")


def landing(path: str | Path) -> set[Path]:
    """Where a write to `path` lands: the entry an atomic rename replaces (the parent folder
    resolved, the name kept) and, should `path` be a link, what it points to. Both count, so a
    link into the model folder is refused too."""
    path = Path(path)
    return {Path(os.path.realpath(path.parent)) / path.name, Path(os.path.realpath(path))}


def inside(paths: set[Path], folder: Path) -> bool:
    return any(p == folder or p.is_relative_to(folder) for p in paths)


def check_landings(files: dict[str, str], *, folders: dict[str, str] | None = None, model_path: str | None = None,
                   reads: dict[str, str] | None = None) -> None:
    """`files` (what -> path) and `folders` (what -> a folder the run writes files into) land on
    none of each other, on nothing in `reads` (what -> a file the run reads), and not inside the
    model folder `model_path`."""
    files_at = {what: landing(path) for what, path in files.items()}
    folders_at = {what: landing(path) for what, path in (folders or {}).items()}
    named = {**files, **(folders or {})}
    names = list(files_at)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if files_at[first] & files_at[second]:
                raise UserError(f"{second} ({files[second]}) is the same file as {first} "
                                f"({files[first]}): one would overwrite the other")
    for folder, at in folders_at.items():
        for what, paths in files_at.items():
            if paths & at:
                raise UserError(f"{folder} ({named[folder]}) is the same path as {what} ({files[what]}): "
                                f"give the checkpoints a folder of their own")
    for what, path in (reads or {}).items():
        read = landing(path)
        for written, paths in {**files_at, **folders_at}.items():
            if paths & read or (written in folders_at and inside(read, next(iter(paths)))):
                raise UserError(f"{written} ({named[written]}) would overwrite {what} ({path}), which this run "
                                f"reads; write it elsewhere")
    if model_path is not None:
        model = Path(os.path.realpath(model_path))
        for what, paths in {**files_at, **folders_at}.items():
            if inside(paths, model):
                raise UserError(f"{what} ({named[what]}) is inside the model folder {model_path}: "
                                f"writing it could overwrite the model's files; write outputs elsewhere")


def check_checkpoint_folder(folder: Path) -> None:
    """A checkpoint folder is new, empty or unison's own: its files are removed once the video is
    written, and a folder of someone else's files must never be written into or emptied."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"output.checkpoint_dir {folder} is a file, not a folder")
    if os.listdir(folder) and not is_ours(folder):
        raise UserError(f"output.checkpoint_dir {folder} holds files unison did not write; give the checkpoints "
                        f"a new or empty folder")


def check_output(o: OutputConfig, *, model_path: str | None = None, reads: dict[str, str] | None = None) -> None:
    """Every file the run writes can be written, none lands on another or on what the run
    reads, none inside the model folder `model_path` (a latents file there would replace the
    weights); the checkpoint folder is one unison may write into and empty."""
    files: dict[str, str] = {}
    if o.decode:
        check_writable(o.path, what="output.path", suffix=".mp4")
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            raise UserError(f"writing the video {o.path} needs the 'imageio-ffmpeg' package (its ffmpeg encodes "
                            f"the mp4), which is not installed: pip install imageio-ffmpeg, or render latents "
                            f"only with --set output.decode=false --save-latents PATH.pt")
        # engine/render.py writes the resolved config beside the video (config_path_for).
        beside = str(Path(o.path).with_suffix(".yaml"))
        check_writable(beside, what="the config written beside output.path")
        files["output.path"], files["the config written beside output.path"] = o.path, beside
    if o.save_latents:
        check_writable(o.save_latents, what="output.save_latents")
        files["output.save_latents"] = o.save_latents
    folder = checkpoint_folder(o)
    check_checkpoint_folder(folder)
    check_landings(files, folders={"output.checkpoint_dir": str(folder)}, model_path=model_path, reads=reads)
    if o.fps is not None and o.fps < 1:
        raise UserError(f"output.fps must be at least 1, got {o.fps}")
    if o.fps is not None and o.fps > MAX_FPS:
        raise UserError(f"output.fps must be at most {MAX_FPS}, got {o.fps}")


def check_batch_output(out_dir: str | Path, config: RunConfig) -> None:
    """A batch's folder (every job writes <id>.mp4 and <id>.yaml there): a folder, outside the
    model folder, and no single latents file that every job would overwrite."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, not a folder: {out}")
    model_path = config.model.path
    if model_path is not None and inside(landing(out), Path(os.path.realpath(model_path))):
        raise UserError(f"--out {out} is inside the model folder {model_path}: the batch's videos could "
                        f"overwrite the model's files; write them elsewhere")
    if config.output.save_latents:
        raise UserError(f"output.save_latents names one file ({config.output.save_latents}) that every job "
                        f"of a batch would overwrite; a batch saves videos only")
