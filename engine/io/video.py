"""Videos: uint8 frames to an H.264 mp4, written through `commit` (engine/io/writes.py) and checked by
decoding it back.

The encoder is the ffmpeg that imageio-ffmpeg ships, driven directly rather than through imageio's
writer (imageio 2.38, imageio-ffmpeg 0.8): on close it waits for ffmpeg but never looks at its exit
status (nor lets a caller see it), and it silences ffmpeg's messages by default, so an encoder that
died of a full disk or a file-size limit left a short file that looked written. It reports only a
broken pipe while frames are still being sent, as an OSError carrying the whole command line.
Here a failure is the encoder's status with its first error line, and the file counts as written
only when every frame decodes back at the right size.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from unison.engine.io.writes import NotWritten, Write, commit, one_line

CRF = 25
"""x264 quality (lower is better), what imageio's writer used at its default quality of 5."""


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """(F, H, W, C) floats in [0, 1] -> uint8 RGB frames."""
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _check_frames(frames: np.ndarray, height: int | None = None, width: int | None = None) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or \
            (height is not None and frames.shape[1:3] != (height, width)):
        raise ValueError(f"expected uint8 frames (F, H, W, 3)" + (f" of {width}x{height}" if height else "") +
                         f", got {frames.dtype} {tuple(frames.shape)}")


def encode_mp4(path: Path, frames, *, fps: int, height: int | None = None, width: int | None = None) -> None:
    """Encode uint8 frames (F, H, W, 3) into `path`; NotWritten when the encoder fails. `frames` may
    also be an iterable of such chunks (a video streamed as it is decoded, never held whole), with
    `height` and `width` given."""
    if isinstance(frames, np.ndarray):
        _check_frames(frames)
        _, height, width, _ = frames.shape
        chunks = [frames]
    else:
        chunks = frames
    # Sizes are multiples of 16 already, so nothing is rescaled.
    command = [ffmpeg(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(CRF),
               str(path)]
    with tempfile.TemporaryFile() as messages:  # a file, not a pipe: the encoder never blocks on it
        # Its own session: Ctrl-C in a terminal reaches only us, and we end the encoder ourselves.
        encoder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=messages,
                                   bufsize=0, start_new_session=True)
        try:
            try:
                for chunk in chunks:
                    _check_frames(chunk, height, width)
                    for frame in chunk:
                        encoder.stdin.write(np.ascontiguousarray(frame).tobytes())
            except BrokenPipeError:
                pass  # the encoder ended early; its status and message say why
            finally:
                encoder.stdin.close()
            status = encoder.wait()
        finally:
            if encoder.poll() is None:  # interrupted: no half-written file keeps being written
                encoder.kill()
                encoder.wait()
        if status != 0:
            messages.seek(0)
            said = messages.read().decode(errors="replace")
            if status < 0:  # e.g. SIGXFSZ: subprocess restores its default action, which ends ffmpeg
                how = f"was killed by {signal.Signals(-status).name} ({signal.strsignal(-status)})"
            else:
                how = f"exited with status {status}"
            raise NotWritten(f"the video encoder (ffmpeg) {how}" + (f": {one_line(said)}" if said.strip() else ""))


def check_mp4(path: Path, *, frames: int, height: int, width: int) -> None:
    """Decode every frame of `path` (ffmpeg's framecrc: no frame data crosses the pipe); NotWritten
    unless it decodes cleanly into `frames` frames of width x height."""
    proc = subprocess.run([ffmpeg(), "-v", "error", "-xerror", "-i", str(path), "-map", "0:v:0",
                           "-pix_fmt", "rgb24", "-f", "framecrc", "-"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NotWritten(f"it does not decode: {one_line(proc.stderr)}")
    lines = proc.stdout.splitlines()
    size = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("#dimensions")), "?")
    count = sum(1 for line in lines if line.strip() and not line.startswith("#"))
    if (count, size) != (frames, f"{width}x{height}"):
        raise NotWritten(f"it reads back as {count} frames of {size}, not {frames} of {width}x{height}")


def mp4_write(path: str | Path, frames: np.ndarray, *, fps: int) -> Write:
    """The Write of an mp4 (for `commit`, beside its config)."""
    count, height, width = frames.shape[:3]
    return Write(Path(path), lambda tmp: encode_mp4(tmp, frames, fps=fps),
                 lambda tmp: check_mp4(tmp, frames=count, height=height, width=width))


def mp4_stream_write(path: str | Path, chunks, *, frames, height: int, width: int, fps: int) -> Write:
    """The Write of an mp4 whose frames come as they are made: `chunks()` gives an iterable of
    uint8 (F, H, W, 3) arrays; `frames()` their count, asked once they are written (a stream may
    learn it as it goes), checked on read-back."""
    return Write(Path(path), lambda tmp: encode_mp4(tmp, chunks(), fps=fps, height=height, width=width),
                 lambda tmp: check_mp4(tmp, frames=frames(), height=height, width=width))


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int) -> None:
    """Write uint8 frames (F, H, W, 3) as an H.264 mp4: encoded, decoded back, then renamed into place."""
    commit(mp4_write(path, frames, fps=fps))


def video_frames(path: str | Path, *, what: str = "sampling.extend"):
    """The frames of the video at `path` as uint8 (H, W, 3) arrays, decoded one at a time by the
    ffmpeg imageio-ffmpeg ships (any file it reads). UserError naming `what` for a missing file or
    one that does not decode."""
    import imageio_ffmpeg

    from unison.engine.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"{what}: no such file: {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    except (RuntimeError, OSError, StopIteration) as err:
        raise UserError(f"{what}: {path} is not a video ffmpeg reads ({one_line(str(err))})") from None
    width, height = meta["size"]
    try:
        for raw in reader:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def video_info(path: str | Path, *, what: str = "sampling.extend") -> tuple[int, int, int]:
    """(frames, height, width) of the video at `path`, every frame decoded and counted (a header's
    count can be an estimate)."""
    count, height, width = 0, 0, 0
    for frame in video_frames(path, what=what):
        count, (height, width) = count + 1, frame.shape[:2]
    return count, height, width
