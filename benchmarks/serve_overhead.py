"""What `unison serve` costs against `unison batch` for the same jobs, and its request latency.

The same N tiny jobs (the embedded default, tiny Wan 2.1; each its own seed) run three ways, in one
run on this machine:
- `unison batch` (one process): its job phase is the manifest's seconds per job, summed (the engine
  renders one job after another), and its wall time from launch to exit;
- `unison serve` (one local engine): the jobs created through the `openai` client, one after another
  as fast as the server answers, then polled until all are completed; its job phase is first create
  to last completed (seen by listing every 100 ms), and its wall time from launch to the last
  completed (startup and model load included, as batch's is). Create and retrieve latencies are
  measured under that load (retrieve: one request every 50 ms from a second thread while the jobs
  render; the `openai` client's own poll() asks once a second).
Each way runs --repeat times (alternating); the table gives the best of each (this machine is
shared: the best is the least disturbed), and every run's job phase is listed below it.
Throughput ratio = serve's jobs per second in the job phase / batch's. Timings, so never a test.

    python benchmarks/serve_overhead.py [--jobs 20] [--steps 4] [--repeat 3] [--write FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serving import Server  # noqa: E402  (the tests' server wrapper)


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"{1000 * statistics.median(ordered):.1f} / {1000 * pick(0.95):.1f} / {1000 * ordered[-1]:.1f}"


def run_batch(tmp: Path, jobs: int, steps: int) -> tuple[float, float]:
    lines = tmp / "jobs.jsonl"
    lines.write_text("".join(json.dumps({"id": f"j{i}", "prompt": f"a tiny clip {i}", "seed": i}) + "\n"
                             for i in range(jobs)))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unison", "batch", str(lines), "--out", str(tmp / "batch"), "--steps",
                    str(steps), "--no-progress"], check=True, capture_output=True)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (tmp / "batch" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == jobs and all(r["status"] == "done" for r in records)
    return wall, sum(r["seconds"] for r in records)


def run_serve(tmp: Path, jobs: int, steps: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    launched = time.perf_counter()
    server = Server(tmp / "serve", "--steps", str(steps), "--max-queued-per-client", str(jobs)).start()
    try:
        client = server.client()
        creates, retrieves, ids = [], [], []
        first = time.perf_counter()
        for i in range(jobs):
            t = time.perf_counter()
            ids.append(client.videos.create(prompt=f"a tiny clip {i}", extra_body={"seed": i}).id)
            creates.append(time.perf_counter() - t)
        stop = threading.Event()

        def poll() -> None:
            probe = server.client()
            while not stop.is_set():
                t = time.perf_counter()
                probe.videos.retrieve(ids[-1])
                retrieves.append(time.perf_counter() - t)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        pending = set(ids)
        while pending:
            pending -= {v.id for v in client.videos.list(limit=100) if v.status == "completed"}
            time.sleep(0.1)
        done = time.perf_counter()
        stop.set()
        poller.join()
        assert server.stop() == 0
    finally:
        server.kill()
    return {"job_phase": done - first, "wall": done - launched, "creates": creates, "retrieves": retrieves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write", help="markdown file for the results")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = os.getloadavg()
    batches, serves = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            batches.append(run_batch(Path(folder), args.jobs, args.steps))
        with tempfile.TemporaryDirectory() as folder:
            serves.append(run_serve(Path(folder), args.jobs, args.steps))
    batch_wall, batch_jobs = min(batches, key=lambda b: b[1])
    serve = min(serves, key=lambda s: s["job_phase"])
    ratio = (args.jobs / serve["job_phase"]) / (args.jobs / batch_jobs)
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# `unison serve` against `unison batch`, {datetime.date.today()}",
        "",
        f"Device: CPU only ({cpu}, {os.cpu_count()} cores), torch threads default; tiny random-weight Wan 2.1 "
        f"(the embedded default, 64x64, 9 frames), {args.steps} steps, {args.jobs} jobs. Load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end. Command: "
        f"`python benchmarks/serve_overhead.py --jobs {args.jobs} --steps {args.steps} --repeat {args.repeat}`.",
        "",
        "| how the jobs ran | job phase s | jobs/s in the job phase | wall s (launch to last video) |",
        "|---|---:|---:|---:|",
        f"| `unison batch`, one process (best run) | {batch_jobs:.2f} (manifest seconds, summed) | {args.jobs / batch_jobs:.2f} "
        f"| {batch_wall:.2f} |",
        f"| `unison serve`, one local engine, `openai` client (best run) | {serve['job_phase']:.2f} (first create to last "
        f"completed) | {args.jobs / serve['job_phase']:.2f} | {serve['wall']:.2f} |",
        "",
        f"Throughput ratio, serve / batch (job phase, best of {args.repeat} each): **{ratio:.3f}**. Every run's "
        f"job phase, s: batch {', '.join(f'{b[1]:.2f}' for b in batches)}; serve "
        f"{', '.join(f'{phase:.2f}' for phase in (r['job_phase'] for r in serves))}.",
        "",
        "Request latency under that load, in serve's best run (median / 95th percentile / max, ms):",
        "",
        "| request | n | latency ms |",
        "|---|---:|---:|",
        f"| create (`videos.create`: validate, fsync the job record, queue) | {len(serve['creates'])} | "
        f"{_quantiles(serve['creates'])} |",
        f"| retrieve (`videos.retrieve`, every 50 ms while the jobs render) | {len(serve['retrieves'])} | "
        f"{_quantiles(serve['retrieves'])} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
