"""A wheel install works without the checkout: the recipes ship as package data, so `unison` with
no arguments renders the embedded default from an installed wheel (no editable install, no
network: the wheel is built here and installed with --no-index into a fresh venv that borrows
only this environment's dependencies)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_a_wheel_installed_into_a_fresh_venv_renders_the_embedded_default(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("unison_video-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"unison/configs/tiny-wan.yaml", "unison/configs/wan2.1-t2v-1.3b/base.yaml"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    # The dependencies (and pip) from this environment; its .pth files (the editable unison) are
    # not processed from a path a .pth adds, so the checkout stays invisible.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], env=env)

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import unison.launch.cli as c; print(c.configs_dir())"],
                 cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    _run([str(venv / "bin" / "unison")], cwd=work, env=env)
    assert (work / "unison.mp4").stat().st_size > 0
    assert "family: wan" in (work / "unison.yaml").read_text()  # the resolved tiny-wan.yaml beside it
