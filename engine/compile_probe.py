"""Does torch.compile work here? Asked before anything loads, of a tiny program in a child process,
and remembered per machine.

A compiler that is on PATH but does not work (a broken toolchain, a wrong CXX, Triton without a
matching driver) used to pass the plan-time check and fail after the model had loaded, in a
hundred-line traceback. The child process compiles and runs one small function on the device
type with inductor, as the engine's regional compilation would; its last error line becomes the
one-line refusal. The answer is kept in `$XDG_CACHE_HOME/unison/compile-probe.json` (default
`~/.cache`), keyed by torch's version, the device type and the compiler (CXX, its path and
modification time), so a fixed toolchain is asked again and a working one only once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import torch
f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor", fullgraph=True)
x = torch.ones(64, device={device!r})
assert torch.allclose(f(x), torch.sin(x) * 2 + 1)
"""
TIMEOUT_S = 600


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "unison" / "compile-probe.json"


def _compiler() -> str:
    """What inductor would compile with: CXX, else the first C++ compiler on PATH; with its mtime."""
    name = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), "")
    path = shutil.which(name) if name else None
    stamp = os.stat(path).st_mtime_ns if path else 0
    return f"{name}|{path}|{stamp}"


def key(device_type: str) -> str:
    import torch

    text = json.dumps([torch.__version__, device_type, _compiler(), sys.executable])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _reason(stderr: str, status: int) -> str:
    """The exception's own line (the last `SomeError: ...` line, not dynamo's closing hint)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("File ", "Set TORCHDYNAMO")) and
              line.split(":", 1)[0].rsplit(".", 1)[-1].endswith(("Error", "Exception", "Failed"))]
    return (errors or lines or [f"exit status {status}"])[-1][:300]


def probe(device_type: str) -> str | None:
    """None when torch.compile works for `device_type` here, else the reason (one line)."""
    found = _read().get(key(device_type))
    if isinstance(found, dict) and "works" in found:
        return None if found["works"] else str(found.get("reason", "it failed"))
    try:
        proc = subprocess.run([sys.executable, "-c", PROGRAM.format(device=device_type)], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        reason = None if proc.returncode == 0 else _reason(proc.stderr, proc.returncode)
    except subprocess.TimeoutExpired:
        reason = f"compiling a tiny program took over {TIMEOUT_S} s"
    from unison.engine.io.writes import commit, text_write
    from unison.engine.errors import WriteFailed

    data = {**_read(), key(device_type): {"works": reason is None, "reason": reason}}
    try:
        commit(text_write(cache_file(), json.dumps(data, indent=1) + "\n"))
    except WriteFailed:
        pass  # a read-only home: ask again next time
    return reason
