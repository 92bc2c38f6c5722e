"""Every file the engine writes is complete or absent: write a temporary, read it back, fsync, rename.

`commit(*writes)` is the one way a result reaches its path (videos, their configs, latents, and any
later checkpoint). Each `Write` produces a temporary beside its target and checks it by reading it
back (a video decoded and its frames counted, a tensor loaded and compared, text compared byte for
byte); each temporary is fsynced, and only when every one has passed are they renamed over their
targets, in order, and the folders fsynced. `append_line` keeps the same promise for a record
appended to a file (the batch manifest).

A failure (the encoder exits non-zero, a full disk or a file-size limit, a short read-back) raises
`WriteFailed`, one line naming the file and the cause; an interruption (any other exception,
KeyboardInterrupt, SIGTERM) propagates as itself. Either way every temporary is removed and no
target appears. A SIGTERM that arrives during a commit on the main thread first lets the temporaries
be removed, then goes to whatever handled it before (by default the process then ends by it, as it
would have). A temporary that survives anyway (SIGKILL, power loss) is `.<stem>.<random>.part<suffix>`;
the next commit to the same target removes it, and so does a batch when it resumes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from unison.engine.errors import WriteFailed


class NotWritten(Exception):
    """Raised by a Write's produce or check step: the file is not what was meant (why, in one line).
    `commit` turns it into WriteFailed naming the file."""


@dataclass(frozen=True)
class Write:
    """One file of a commit."""

    path: Path
    """The target."""
    produce: Callable[[Path], None]
    """Writes the content to the temporary path it is given."""
    check: Callable[[Path], None]
    """Reads the temporary back; raises (NotWritten, or anything) when it is not what was written."""


def one_line(text: str) -> str:
    """The first non-empty line of `text`, without ffmpeg's "[mp4 @ 0x…] " context prefix."""
    for line in str(text).splitlines():
        line = re.sub(r"^(\[[^]]*\]\s*)+", "", line).strip()
        if line:
            return line[:300]
    return "no message"


def failure_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror  # "No space left on device", without the temporary's name
    return one_line(str(err)) if str(err) else type(err).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems cannot fsync a folder; the rename itself is still atomic there.
        if not (folder and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def stale_parts(target: Path) -> list[Path]:
    """Temporaries of `target` that an earlier, killed writer left behind (mkstemp's 8-character names)."""
    name = re.compile(rf"\.{re.escape(target.stem)}\.[a-z0-9_]{{8}}\.part{re.escape(target.suffix)}")
    try:
        entries = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in entries if name.fullmatch(n)]


class _Terminated(BaseException):
    """SIGTERM arrived while a commit was under way (raised so that its cleanup runs)."""


class _SigtermGuard:
    """While a commit runs on the main thread, SIGTERM raises _Terminated inside it (or, during the
    renames, waits for them); on leaving, the signal goes again to the handler that was there
    before. Elsewhere signals cannot arrive, and this does nothing."""

    def __init__(self, label: Path):
        self.label, self.previous, self.pending, self.holding = label, None, False, False

    def __enter__(self) -> "_SigtermGuard":
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            # None: set outside Python; leave it alone. A handler that only notes the signal
            # (engine/io/stop.py: stop after this step) lets the commit finish as it is.
            if previous not in (signal.SIG_IGN, None) and not getattr(previous, "deferred_stop", False):
                self.previous = previous
                signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pending = True
        if not self.holding:
            raise _Terminated

    def hold(self) -> None:
        """From now on a SIGTERM waits until the commit is over (the renames are all or nothing)."""
        self.holding = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.previous is None:
            return False
        signal.signal(signal.SIGTERM, self.previous)
        if self.pending:
            signal.raise_signal(signal.SIGTERM)  # SIG_DFL: the process ends here, nothing left behind
        if exc_type is _Terminated:  # the earlier handler let the process go on
            raise WriteFailed(f"could not write {self.label}: terminated (SIGTERM)") from None
        return False


def commit(*writes: Write) -> None:
    """Write and check every file, then rename them over their targets in the order given: all
    appear or none does (so put the file whose presence means "finished", the video, last).
    WriteFailed (one line) when one cannot be written; see the module's docstring."""
    if not writes:
        return
    with _SigtermGuard(Path(writes[-1].path)) as guard:
        _commit(writes, guard)


def _commit(writes: tuple[Write, ...], guard: _SigtermGuard) -> None:
    temps: list[Path] = []
    renamed: list[Path] = []
    target = Path(writes[0].path)
    try:
        for write in writes:
            target = Path(write.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in stale_parts(target):
                stale.unlink(missing_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}",
                                        dir=target.parent)
            temps.append(Path(name))
            os.close(fd)
            try:
                write.produce(temps[-1])
            except (NotWritten, OSError):
                raise
            except Exception as err:  # torch.save reports a full disk as a RuntimeError
                raise NotWritten(failure_reason(err)) from err
            try:
                write.check(temps[-1])
            except (NotWritten, OSError):
                raise
            except Exception as err:  # a file that does not even load back is not written
                raise NotWritten(f"it does not read back ({type(err).__name__}: {failure_reason(err)})") from err
            _fsync_path(temps[-1])
            os.chmod(temps[-1], 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual mode
        guard.hold()
        for write, tmp in zip(writes, temps):
            target = Path(write.path)
            os.replace(tmp, target)
            renamed.append(target)
        for folder in dict.fromkeys(path.parent for path in renamed):
            _fsync_path(folder, folder=True)
    except BaseException as err:
        guard.hold()  # a SIGTERM now waits until the cleanup is done
        for path in (*temps, *renamed):
            path.unlink(missing_ok=True)
        # A Ctrl-C between mkstemp and the line that records its name leaves a temporary no list
        # holds: the commit's own targets' temporaries all go.
        for write in writes:
            for stale in stale_parts(Path(write.path)):
                stale.unlink(missing_ok=True)
        if isinstance(err, (NotWritten, OSError)):
            raise WriteFailed(f"could not write {target}: {failure_reason(err)}") from err
        raise


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to a text file, fsync it and read it back. On failure the file is
    cut back to its old length, so no half line is left for the next append to join, and
    WriteFailed says why. (A half line that a crash left is completed by the next append; the
    manifest's reader finds the record after the torn start.)"""
    path = Path(path)
    data = (line + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as err:
        raise WriteFailed(f"could not write {path}: {failure_reason(err)}") from err
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if os.pread(fd, len(data), start) != data:
                raise NotWritten("the line read back differs")
        except BaseException as err:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass  # the reader skips a line that does not parse
            if isinstance(err, (NotWritten, OSError)):
                raise WriteFailed(f"could not write {path}: {failure_reason(err)}") from err
            raise
    finally:
        os.close(fd)


# -- the usual kinds of file ----------------------------------------------------------------------

def text_write(path: str | Path, text: str) -> Write:
    """A text file (a config), checked byte for byte, so a YAML file parses back to the same mapping."""
    return bytes_write(path, text.encode())


def bytes_write(path: str | Path, data: bytes) -> Write:
    """A file of these bytes (a service's job record, an uploaded picture), checked byte for byte."""

    def check(tmp: Path) -> None:
        back = tmp.read_bytes()
        if back != data:
            raise NotWritten(f"it reads back as {len(back)} bytes that differ from the {len(data)} written")

    def produce(tmp: Path) -> None:
        tmp.write_bytes(data)

    return Write(Path(path), produce, check)


def torch_write(path: str | Path, obj: Any) -> Write:
    """A torch.save file (latents, a checkpoint: tensors, possibly in dicts and lists), checked by
    loading it (weights_only) and comparing every tensor's shape, dtype and bits."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()

    def check(tmp: Path) -> None:
        if not _same(torch.load(tmp, map_location="cpu", weights_only=True), obj):
            raise NotWritten("torch.load gives back something else than was saved")

    return Write(Path(path), lambda tmp: torch.save(obj, tmp), check)


def _same(back: Any, saved: Any) -> bool:
    import torch

    if isinstance(saved, torch.Tensor):
        # Bits, not values: NaN latents are saved faithfully too.
        return (isinstance(back, torch.Tensor) and back.shape == saved.shape and back.dtype == saved.dtype
                and torch.equal(back.reshape(-1).view(torch.uint8), saved.cpu().reshape(-1).view(torch.uint8)))
    if isinstance(saved, dict):
        return (isinstance(back, dict) and back.keys() == saved.keys()
                and all(_same(back[k], v) for k, v in saved.items()))
    if isinstance(saved, (list, tuple)):
        return (type(back) is type(saved) and len(back) == len(saved)
                and all(_same(b, s) for b, s in zip(back, saved)))
    return back == saved
