"""Writes that fail are never kept as finished results (issue 15).

Real encoder deaths come from a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): set on a whole
`python -m unison` process (Python's writes fail with EFBIG; ffmpeg, whose SIGXFSZ subprocess
restores, is killed by it), or only on the ffmpeg that encodes one job's video (its writes fail
with EFBIG and it exits non-zero). The rest are unit checks of the read-back and of interruptions."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from unison.engine.io import video
from unison.engine.io import writes
from unison.launch.jobs import Manifest, Record
from unison.engine.errors import WriteFailed

LIMIT = 1664
"""Bytes: above the embedded default's YAML (about 1.0 KB) and the manifest, below its mp4 (about 2.2 KB)."""


def _limit_file_size(limit: int = LIMIT) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _frames(count: int, size: int = 32) -> np.ndarray:
    return (np.random.default_rng(0).random((count, size, size, 3)) * 255).astype(np.uint8)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _encoder_limited_for(monkeypatch, name: str) -> None:
    """Every ffmpeg that encodes into a temporary of `name` runs under the file-size limit."""
    real = subprocess.Popen

    class Popen(real):
        def __init__(self, args, **kwargs):
            if "-i" in args and args[args.index("-i") + 1] == "-" and Path(args[-1]).name.startswith(f".{name}."):
                kwargs["preexec_fn"] = _limit_file_size
            super().__init__(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Popen)


# -- the read-back check ----------------------------------------------------------------------------

def test_truncated_mp4_is_rejected(tmp_path, monkeypatch):
    short = tmp_path / "short.mp4"
    video.encode_mp4(short, _frames(5), fps=8)
    video.check_mp4(short, frames=5, height=32, width=32)
    with pytest.raises(writes.NotWritten, match="reads back as 5 frames of 32x32, not 9 of 32x32"):
        video.check_mp4(short, frames=9, height=32, width=32)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(short.read_bytes()[: short.stat().st_size // 2])
    with pytest.raises(writes.NotWritten, match="does not decode"):
        video.check_mp4(cut, frames=5, height=32, width=32)

    # An encoder that silently drops frames: the commit refuses the file and leaves nothing.
    real = video.encode_mp4
    monkeypatch.setattr(video, "encode_mp4", lambda tmp, frames, *, fps: real(tmp, frames[:5], fps=fps))
    target = tmp_path / "out" / "v.mp4"
    with pytest.raises(WriteFailed, match=r"could not write .*v\.mp4: it reads back as 5 frames"):
        video.write_mp4(target, _frames(9), fps=8)
    assert _leftovers(target.parent) == []


def test_encoder_death_is_an_error(tmp_path, monkeypatch):
    _encoder_limited_for(monkeypatch, "v")
    target = tmp_path / "v.mp4"
    target.write_bytes(b"an older video")
    with pytest.raises(WriteFailed, match=r"v\.mp4: the video encoder \(ffmpeg\) exited with status \d+: "
                                          r".*File too large"):
        video.write_mp4(target, _frames(9, 64), fps=8)
    assert _leftovers(tmp_path) == ["v.mp4"] and target.read_bytes() == b"an older video"  # untouched


def test_text_and_tensors_read_back(tmp_path):
    text, latents = "a: 1\nb: [2, 3]\n", torch.tensor([[1.0, float("nan")], [float("inf"), -0.0]])
    writes.commit(writes.text_write(tmp_path / "c.yaml", text), writes.torch_write(tmp_path / "l.pt", latents))
    assert (tmp_path / "c.yaml").read_text() == text
    bits = torch.load(tmp_path / "l.pt").reshape(-1).view(torch.int32)
    assert bits.tolist() == latents.reshape(-1).view(torch.int32).tolist()  # NaN and -0.0 included

    yaml, pt = writes.text_write(tmp_path / "d.yaml", text), writes.torch_write(tmp_path / "m.pt", latents)
    for good, bad, match in [
        (yaml, lambda tmp: tmp.write_text(text[:5]), "differ"),  # a truncated YAML
        (pt, lambda tmp: torch.save(latents[:1], tmp), "something else"),  # another shape
        (pt, lambda tmp: tmp.write_bytes(b"PK\x03\x04"), "does not read back"),  # a torn zip
    ]:
        with pytest.raises(WriteFailed, match=match):
            writes.commit(writes.Write(good.path, bad, good.check))
    assert _leftovers(tmp_path) == ["c.yaml", "l.pt"]


def test_commit_is_all_or_nothing_and_removes_stale_parts(tmp_path):
    handler = signal.getsignal(signal.SIGTERM)  # whatever earlier tests in this process left
    (tmp_path / "v.yaml").write_text("old config")
    stale = tmp_path / ".v.abcd1234.part.yaml"  # left by a killed writer of the same target
    stale.write_text("")

    def refuse(tmp):
        raise writes.NotWritten("the disk lied")

    with pytest.raises(WriteFailed, match=r"could not write .*v\.mp4: the disk lied"):
        writes.commit(writes.text_write(tmp_path / "v.yaml", "new config"),
                      writes.Write(tmp_path / "v.mp4", lambda tmp: tmp.write_bytes(b"x"), refuse))
    assert _leftovers(tmp_path) == ["v.yaml"] and (tmp_path / "v.yaml").read_text() == "old config"
    assert signal.getsignal(signal.SIGTERM) is handler  # the commit's own handler is gone again


def test_interrupted_write_leaves_no_part(tmp_path, monkeypatch):
    def interrupt(tmp, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "check_mp4", interrupt)
    with pytest.raises(KeyboardInterrupt):
        video.write_mp4(tmp_path / "v.mp4", _frames(3), fps=8)
    assert _leftovers(tmp_path) == []

    # SIGTERM, in a fresh process (the default handler ends it): first the temporary goes.
    script = ("import os, signal, sys, time, numpy as np\n"
              "import unison.engine.io.video as video\n"
              "def term(tmp, **kw):\n"
              "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
              "video.check_mp4 = term\n"
              "video.write_mp4(sys.argv[1], np.zeros((3, 32, 32, 3), np.uint8), fps=8)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.mp4")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert _leftovers(tmp_path) == []


def test_manifest_append_failure_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    manifest = Manifest(tmp_path)
    first = Record(id="a", status="done", attempts=1, seconds=1.0)
    manifest.append(first)
    before = manifest.path.read_bytes()

    def half_then_full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    full_disk = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    full_disk.write = half_then_full
    monkeypatch.setattr(writes, "os", full_disk)
    with pytest.raises(WriteFailed, match=r"manifest\.jsonl: No space left on device"):
        manifest.append(Record(id="b", status="done", attempts=1, seconds=1.0))
    assert manifest.path.read_bytes() == before  # no half line for the next append to join
    monkeypatch.undo()
    manifest.append(Record(id="c", status="retry", attempts=1, seconds=1.0))
    assert [r.id for r in manifest.records()] == ["a", "c"]


# -- end to end -------------------------------------------------------------------------------------

def test_generate_under_a_file_size_limit(tmp_path):
    """`python -m unison` whose encoder dies of EFBIG: exit 74, one error line, nothing left."""
    out = tmp_path / "out"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "unison", "--steps", "1", "--output", str(out / "v.mp4")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 74, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and [line for line in lines if "error" in line.lower()] == lines[-1:]
    # ffmpeg's own writes hit the limit: SIGXFSZ ends it (subprocess restores the default action).
    assert lines[-1] == (f"unison: error: could not write {out / 'v.mp4'}: the video encoder (ffmpeg) was killed "
                         "by SIGXFSZ (File size limit exceeded)"), lines[-1]
    assert "wrote" not in proc.stdout
    assert _leftovers(out) == []  # neither the video nor its config, and no .part


def test_batch_write_failure_is_not_done_and_a_rerun_renders_it(tmp_path, monkeypatch, capsys):
    from unison.launch.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": i, "prompt": f"a {i} cat", "seed": n}) + "\n"
                            for n, i in enumerate(["first", "second", "third"])))
    out = tmp_path / "out"
    batch = ["batch", str(jobs), "--out", str(out), "--no-progress", "--steps", "1"]

    _encoder_limited_for(monkeypatch, "second")  # the disk fills while the second video is written
    assert main(batch) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"unison: error: could not write {out / 'second.mp4'}: the video encoder"), err
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["attempts"]) for r in records] == [("first", "done", 1), ("second", "retry", 1)]
    assert records[1]["error"].startswith("WriteFailed: could not write")
    assert _leftovers(out) == ["first.mp4", "first.yaml", "manifest.jsonl"]
    first = (out / "first.mp4").stat().st_mtime_ns

    monkeypatch.undo()  # space again
    assert main(batch) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["attempts"]) for r in records[2:]] == [("second", "done", 2), ("third", "done", 1)]
    assert (out / "first.mp4").stat().st_mtime_ns == first  # not rendered again
    assert video.check_mp4(out / "second.mp4", frames=9, height=64, width=64) is None
    assert _leftovers(out) == ["first.mp4", "first.yaml", "manifest.jsonl", "second.mp4", "second.yaml",
                               "third.mp4", "third.yaml"]


# -- every write failure is one line and exit 74, with nothing left --------------------------------

def test_saved_latents_on_a_full_disk_are_a_write_failure(tmp_path):
    """torch.save reports the disk's refusal as a RuntimeError: it is `could not write`, exit 74."""
    out = tmp_path / "out"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "unison", "--steps", "1", "--set", "output.decode=false",
                           "--save-latents", str(out / "z.pt")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=lambda: _limit_file_size(600))
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"unison: error: could not write {out / 'z.pt'}: ")
    assert _leftovers(out) == []


def test_ctrl_c_right_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The window between mkstemp and recording its name: the commit's cleanup still finds it."""
    closes = []
    real = os.close

    def interrupted_close(fd):
        real(fd)
        closes.append(fd)
        if len(closes) == 2:  # the second file's temporary exists and is not yet recorded
            raise KeyboardInterrupt

    fake = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    fake.close = interrupted_close
    monkeypatch.setattr(writes, "os", fake)
    with pytest.raises(KeyboardInterrupt):
        writes.commit(writes.text_write(tmp_path / "a.yaml", "a: 1\n"), writes.text_write(tmp_path / "b.yaml", "b\n"))
    assert _leftovers(tmp_path) == []


def test_a_full_disk_while_taking_the_batch_lock_is_a_write_failure(tmp_path, monkeypatch):
    import unison.launch.batch as batch

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fake = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    fake.pwrite = full
    monkeypatch.setattr(batch, "os", fake)
    with pytest.raises(WriteFailed, match=r"could not write .*\.unison\.lock: No space left on device$"):
        batch.OutputLock(tmp_path / "out").__enter__()
    assert _leftovers(tmp_path / "out") == []


def test_make_tiny_on_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    from unison.launch.cli import main

    def read_only(self, folder, **kw):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model_index.json").write_text("{")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", read_only)
    assert main(["make-tiny", "--family", "wan", "--out", str(tmp_path / "tiny")]) == 74
    err = capsys.readouterr().err
    assert err == f"unison: error: could not write {tmp_path / 'tiny'}: Read-only file system\n"
    assert not (tmp_path / "tiny").exists()
