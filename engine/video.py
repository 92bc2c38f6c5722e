"""Writing results atomically: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it over `path` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """(F, H, W, C) floats in [0, 1] -> uint8 RGB frames."""
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int) -> None:
    """Write uint8 frames (F, H, W, 3) as H.264 mp4 through imageio-ffmpeg, atomically."""
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        # macro_block_size=1: never resize; sizes are multiples of 16 already.
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    macro_block_size=1, pixelformat="yuv420p")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensor(path: str | Path, tensor: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        torch.save(tensor.detach().cpu(), tmp)
