"""A `unison serve` process for tests: started on a free loopback port, stopped or killed at will."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TOKEN = "test-token-0123456789abcdef"


class Server:
    def __init__(self, out: Path, *args: str, env: dict[str, str] | None = None, token: str | None = TOKEN,
                 cwd: Path | None = None, torchrun: int = 0):
        self.out, self.args, self.token, self.cwd, self.torchrun = Path(out), args, token, cwd, torchrun
        self.env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if token is not None:
            self.env["UNISON_SERVE_TOKEN"] = token
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.lines: list[str] = []

    def start(self, *, ready_s: float = 180) -> "Server":
        self.url, self.lines = "", []
        launcher = [sys.executable]
        if self.torchrun:  # every rank one engine; rank 0 serves
            from multirank import free_port

            launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(self.torchrun),
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        command = [*launcher, "-m", "unison", "serve", "--out", str(self.out), "--port", "0", *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + ready_s
        while not self.url:
            line = self._line(deadline)
            match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if match:
                self.url = match.group(1)
        while time.monotonic() < deadline:  # the engine is loaded once /healthz says so
            if self.health().get("engine") == "ready":
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the server's engine did not come up: {self.output()}")

    def _line(self, deadline: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line and self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}: {''.join(self.lines)}")
                self.lines.append(line)
                return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {''.join(self.lines)}")
        raise TimeoutError(f"no line from the server: {''.join(self.lines)}")

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                return json.load(response)
        except OSError:
            return {}

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.token or "none", max_retries=0, timeout=60)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def output(self) -> str:
        """What the server printed so far (read without blocking)."""
        if self.proc is not None and self.proc.stdout is not None:
            while select.select([self.proc.stdout], [], [], 0)[0]:
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.lines.append(line)
        return "".join(self.lines)

    def stop(self, *, timeout: float = 120) -> int:
        """SIGTERM (a graceful stop: the running job checkpoints) and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.output()
        return code

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, kind, error, trace) -> None:
        """Killed on leaving; on a failure its output is printed first (pytest shows it)."""
        self.kill()
        if error is not None:
            if self.proc is not None and self.proc.stdout is not None:
                self.lines.append(self.proc.stdout.read())  # to the end: the process is gone
            print(f"--- the server's output ---\n{''.join(self.lines)[-12000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.output()
        return code


def wait_for(client, video_id: str, *, timeout: float = 120, until=("completed", "failed")):
    """Poll retrieve until the video's status is one of `until`."""
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in until:
            return video
        if time.monotonic() > deadline:
            raise TimeoutError(f"{video_id} still {video.status} after {timeout} s")
        time.sleep(0.1)


def wait_step(client, video_id: str, *, at_least: int, timeout: float = 60) -> None:
    """Poll retrieve until the video's render is at step `at_least` (1-based) or past it."""
    deadline = time.monotonic() + timeout
    while (client.videos.retrieve(video_id).model_extra.get("step") or 0) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{video_id} did not reach step {at_least} in {timeout} s")
        time.sleep(0.05)


def long_job(client, *, timeout: float = 60) -> str:
    """A job of 400 steps, returned once it is at step 3 (the tests then delete it mid-render)."""
    video = client.videos.create(prompt="a long one", extra_body={"steps": 400, "frames": 5})
    wait_step(client, video.id, at_least=3, timeout=timeout)
    return video.id


def files_of(folder: Path) -> set[str]:
    """Every file and folder under `folder`, relative (the lock file, which a running server holds, left out)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".unison.lock"}
