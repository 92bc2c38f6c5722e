"""Peak host memory of a diffusion-forcing render against its number of windows, on the CPU.

The tiny SkyReels-V2 DF model at 192x320 (its VAE's frames are what grows with the video: 0.7
MB per float32 frame), 17-frame windows with a 5-frame overlap, so each window after the first
adds 12 frames: 1, 2, 4 and 8 windows are 17, 29, 53 and 101 frames. One step, no guidance.
Each render runs in a fresh process, whose peak resident memory (ru_maxrss) is the figure, with
glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc raises that
threshold as large buffers are freed, after which freed buffers stay in the heap and RSS creeps
up with fragmentation, not with what the process holds (the last column shows it: on this
machine one series read 624, 660, 662 and 680 MiB for 2, 4, 8 and 16 windows, another 659,
659, 645 and 654; with the threshold fixed, 534, 533, 534 and 533).

- streamed: `unison`'s render (engine/windows.py, engine/render.py): the finished windows' latents
  on disk, decoded window by window into the mp4 encoder;
- whole: the same latents decoded at once and written from one array (what a render that holds the
  video would cost), for contrast.

    python benchmarks/forcing_memory.py [--windows 1 2 4 8]

Writes benchmarks/results/<date>-forcing-memory-cpu.md naming the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH, WINDOW, OVERLAP, STEPS = 192, 320, 17, 5, 1
MMAP_THRESHOLD = 65536


def frames_for(windows: int) -> int:
    """Pixel frames of a video of `windows` windows: the first 17, each later one 12 more."""
    return WINDOW + (windows - 1) * (WINDOW - OVERLAP)


def child(windows: int, *, whole: bool, out: Path) -> dict:
    import time

    import torch

    from unison.engine.config import ModelConfig, OutputConfig, RunConfig, SamplingConfig
    from unison.engine.io.video import to_uint8_frames, write_mp4
    from unison.engine.render import Engine

    config = RunConfig(
        model=ModelConfig(family="skyreels-v2-df", dtype="float32"),
        sampling=SamplingConfig(prompt="a long walk", height=HEIGHT, width=WIDTH, frames=frames_for(windows),
                                window_frames=WINDOW, overlap_frames=OVERLAP, steps=STEPS, guidance=1.0,
                                max_sequence_length=16),
        output=OutputConfig(path=str(out / "video.mp4"), progress=False, decode=not whole))
    started = time.perf_counter()
    engine = Engine.from_config(config)
    result = engine.render()
    if whole:
        with torch.no_grad():
            video = engine.plan.spec.hooks.decode(engine.pipe.vae, result.latents)
        frames = to_uint8_frames(engine.pipe.video_processor.postprocess_video(video, output_type="np")[0])
        write_mp4(out / "video.mp4", frames, fps=24)
    return {"windows": result.loop.windows.count, "frames": config.sampling.frames,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": time.perf_counter() - started}


def measure(windows: int, *, whole: bool = False, fixed_threshold: bool = True) -> dict:
    """Run one render in a fresh interpreter; its peak RSS and what it rendered."""
    return measure_all([windows], whole=whole, fixed_threshold=fixed_threshold)[0]


def measure_all(counts: list[int], *, whole: bool = False, fixed_threshold: bool = True) -> list[dict]:
    """`measure` for each count, the renders side by side (each its own process, one thread): the
    same peaks, in less wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    with tempfile.TemporaryDirectory() as root:
        procs = []
        for index, windows in enumerate(counts):
            folder = Path(root) / str(index)
            folder.mkdir()
            procs.append((windows, subprocess.Popen(
                [sys.executable, __file__, "--child", str(windows), "--out", str(folder), *(["--whole"] if whole else [])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder)))
        results = []
        for windows, proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"the {windows}-window render failed: {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--child", type=int)
    parser.add_argument("--whole", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, whole=args.whole, out=Path(args.out))))
        return
    rows = []
    for windows in args.windows:
        streamed, whole = measure(windows), measure(windows, whole=True)
        default = measure(windows, fixed_threshold=False)
        rows.append((streamed, whole, default))
        print(f"{windows} windows, {streamed['frames']} frames: streamed {streamed['peak_rss'] / 2**20:.0f} MiB, "
              f"whole {whole['peak_rss'] / 2**20:.0f} MiB, streamed with glibc's default "
              f"{default['peak_rss'] / 2**20:.0f} MiB", flush=True)
    base = rows[min(1, len(rows) - 1)][0]["peak_rss"]
    lines = [f"# Diffusion forcing: peak host memory against windows ({datetime.date.today()})", "",
             f"Device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch "
             f"{__import__('torch').__version__}. Tiny SkyReels-V2 DF at {HEIGHT}x{WIDTH}, {WINDOW}-frame windows, "
             f"{OVERLAP}-frame overlap, {STEPS} step(s), no guidance; each render in a fresh process, peak RSS "
             f"(ru_maxrss) with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (see the script's docstring), and, last "
             f"column, with glibc's default. `python benchmarks/forcing_memory.py`.", "",
             "| windows | frames | streamed (unison) MiB | vs 2 windows | whole decode MiB | vs 2 windows | "
             "streamed, glibc default MiB | vs 2 windows |",
             "|---|---|---|---|---|---|---|---|"]
    whole_base = rows[min(1, len(rows) - 1)][1]["peak_rss"]
    default_base = rows[min(1, len(rows) - 1)][2]["peak_rss"]
    for streamed, whole, default in rows:
        lines.append(f"| {streamed['windows']} | {streamed['frames']} | {streamed['peak_rss'] / 2**20:.0f} | "
                     f"{streamed['peak_rss'] / base:.3f} | {whole['peak_rss'] / 2**20:.0f} | "
                     f"{whole['peak_rss'] / whole_base:.3f} | {default['peak_rss'] / 2**20:.0f} | "
                     f"{default['peak_rss'] / default_base:.3f} |")
    lines += ["", "Streamed: the finished windows' latents are kept on disk in the checkpoint folder and decoded "
              "window by window into the encoder, the causal VAE's cache carried across windows (the frames equal "
              "a whole decode bitwise: tests/test_forcing.py). Whole: the same latents decoded at once and written "
              "from one array. The device side (CUDA peak) is the same design; not measured here (no GPU)."]
    path = ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-forcing-memory-cpu.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
