"""The engine's denoising loop vs diffusers' own pipeline on the same tiny model, same run.

Both produce final latents (no decode) from the same folder, prompt, seed and steps; runs
alternate so that machine noise hits both alike. Prints a table and writes a dated result
file naming the device. Goal: ratio of medians (unison / diffusers) <= 1.05.

    python benchmarks/loop_vs_diffusers.py [--family wan] [--repeats 7] [--sampling KEY=VALUE ...]

A diffusion-forcing video in windows, for instance:

    python benchmarks/loop_vs_diffusers.py --family skyreels-v2-df --frames 33 \
        --sampling window_frames=17 --sampling overlap_frames=5 --sampling addnoise_condition=20

What differs between families (guidance, text length, a picture) is read from their specs by
tests/families.py, the parity battery's own runner, so a new family needs no edit here.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor()}"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import families  # tests/families.py: a family's diffusers call for a unison sampling, from its spec

    from unison.engine.config import ModelConfig, OutputConfig, RunConfig
    from unison.engine.models import get_spec
    from unison.engine.render import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="wan")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                    help="another sampling field (YAML value), e.g. window_frames=17")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import yaml

    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.sampling)}

    work = Path(tempfile.mkdtemp())
    folder = work / args.family
    get_spec(args.family).build_tiny(0).save_pretrained(folder)
    # Two guidance branches, the family's own text length and a picture where it needs one; a
    # family whose pipeline sizes the video from the picture keeps that size.
    size = {} if families.sizes_the_video(args.family) else dict(height=args.height, width=args.width)
    sampling = families.sampling(args.family, steps=args.steps, folder=work, prompt="a cat", negative_prompt="blurry",
                                 frames=args.frames, **size, **extra)
    config = RunConfig(model=ModelConfig(path=str(folder)), sampling=sampling,
                       output=OutputConfig(decode=False, progress=False, path=str(work / "video.mp4")))
    engine = Engine.from_config(config)
    s = engine.plan.config.sampling
    pipe = families.pipeline(args.family, str(folder)).to(engine.plan.device)

    def run_ours():
        return engine.render().latents

    def run_theirs():
        return families.run(pipe, args.family, sampling)

    times = {"unison": [], "diffusers": []}
    run_ours(), run_theirs()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("unison", run_ours), ("diffusers", run_theirs)):
            t0 = time.perf_counter()
            latents = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "unison":
                ours = latents
            else:
                err = ((ours - latents).norm() / latents.norm()).item()

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["unison"] / med["diffusers"]
    dev = device_name(engine.plan.device)
    today = datetime.date.today().isoformat()
    rows = [
        f"# Denoising loop: unison vs diffusers ({args.family}, tiny random weights)",
        "",
        f"- date: {today}",
        f"- device: {dev}",
        f"- torch {torch.__version__}; workload: {s.width}x{s.height}, {s.frames} frames, {s.steps} steps, "
        f"CFG two branches, float32, no decode; {args.repeats} alternating repeats after one warm-up"
        + (f"; {', '.join(f'{k} {v}' for k, v in extra.items())}" if extra else "")
        + (f"; {engine.render().loop.windows.count} windows" if engine.plan.spec.forcing else ""),
        f"- final-latent relative error unison vs diffusers: {err:.2e}",
        "",
        "| runner | median s | min s | max s |",
        "|---|---|---|---|",
        *[f"| {k} | {med[k]:.4f} | {min(v):.4f} | {max(v):.4f} |" for k, v in times.items()],
        "",
        f"ratio of medians unison / diffusers: **{ratio:.3f}** (goal <= 1.05)",
    ]
    text = "\n".join(rows) + "\n"
    print(text)
    kind = "gpu" if engine.plan.device.type == "cuda" else "cpu"
    out = Path(args.out) / f"{today}-loop-vs-diffusers-{args.family}-{kind}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
