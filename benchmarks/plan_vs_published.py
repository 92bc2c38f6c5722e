"""`unison plan`'s projection of the peers' published runs, side by side with what they published.

Each anchor is a published wall time for a stated model, size, steps, GPUs and layout. The plan
projects the same work twice: in the layout the peer ran (the fastest row of `unison plan` with
that layout's degrees that fits) and in the layout the plan recommends. The ratio is published
/ projected (above 1: the projection is faster than the peer was). The projection counts
denoising only (no text encoding, no VAE decode, no start-up), which the published times include,
and computes at the uncalibrated efficiency of engine/planner/hardware.py unless a GPU suite result for
that GPU is in benchmarks/results/; the implied efficiency is the one at which the projection
would equal the published time (compute-only approximation).

    python benchmarks/plan_vs_published.py [--write benchmarks/results/DATE-plan-vs-published.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

from unison.engine.config import RunConfig, config_from_dict
from unison.launch import plan

HUNYUAN_720P = dict(width=1280, height=720, frames=129)
WAN_720P = dict(width=1280, height=720, frames=81)
ANCHORS = [
    # name, published seconds, source, plan request (family included), sampling, cache, the peer's layout
    ("xDiT HunyuanVideo 1280x720x129, 50 steps, 1 x H100", 1904.0,
     "xDiT's published HunyuanVideo timings, as DESIGN.md quotes them",
     dict(family="hunyuanvideo", gpus=1, gpu="h100"), dict(steps=50, **HUNYUAN_720P), "none", {}),
    ("xDiT HunyuanVideo 1280x720x129, 50 steps, 8 x H100, Ulysses 8", 338.0,
     "xDiT's published HunyuanVideo timings, as DESIGN.md quotes them (Ulysses, no cache)",
     dict(family="hunyuanvideo", gpus=8, gpu="h100"), dict(steps=50, **HUNYUAN_720P), "none", {"ulysses": 8}),
    ("ParaAttention HunyuanVideo 1280x720x129, 30 steps, First-Block Cache, 8 x L20", 649.0,
     "ParaAttention's published HunyuanVideo timing, as DESIGN.md quotes it; its layout taken as Ulysses 8 "
     "(context parallelism over the 8 GPUs) and its size as the xDiT anchor's",
     dict(family="hunyuanvideo", gpus=8, gpu="l20", interconnect="pcie"), dict(steps=30, **HUNYUAN_720P),
     "fbcache", {"ulysses": 8}),
    ("MagCache's Wan 2.1 T2V 14B 1280x720x81 baseline, 50 steps, 1 x A800", 3604.0,
     "MagCache4Wan2.1 README (60m04s without a cache), as ../shared/cache-facts.md quotes it",
     dict(family="wan2.1-14b", gpus=1, gpu="a800"), dict(steps=50, **WAN_720P), "none", {}),
    ("EasyCache's Wan 2.1 T2V 14B 1280x720x81 baseline, 50 steps, 1 x H20", 6862.0,
     "EasyCache README (6862 s without a cache), as ../shared/cache-facts.md quotes it",
     dict(family="wan2.1-14b", gpus=1, gpu="h20"), dict(steps=50, **WAN_720P), "none", {}),
]


def project(request: dict, sampling: dict, cache: str, only: dict):
    config = config_from_dict({"sampling": sampling, "cache": {"kind": cache}}, base=RunConfig())
    req = plan.Request(**request)
    model, resolved = plan.real_model(config, req)
    setting, rows, _ = plan.check_layouts(model, resolved, config, req)
    theirs = [r for r in rows if r.fits and all(getattr(r.layout, k) == v for k, v in only.items())]
    return setting, rows[0], (theirs[0] if theirs else None), plan.calibrated(req)


def table() -> str:
    lines = ["| anchor | published s | layout projected | projected s | published / projected | implied efficiency | "
             "recommended layout | projected s | calibration |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, published, source, request, sampling, cache, only in ANCHORS:
        setting, best, theirs, calibration = project(request, sampling, cache, only)
        row = theirs or best
        ratio = published / row.video_s
        implied = setting.efficiency * row.compute_s / max(1e-9, published / setting.steps - row.comm_s)
        lines.append(f"| {name} | {published:,.0f} | {row.layout.name()} | {row.video_s:,.0f} | {ratio:.2f} | "
                     f"{implied:.0%} | {best.layout.name()} | {best.video_s:,.0f} | "
                     f"{calibration.source.split(':')[0]} |")
        if cache != "none":
            notes.append(f"{name}: {setting.cache} assumed to skip {setting.skip_share:.0%} of the steps "
                         f"(the published skip share is not stated).")
        notes.append(f"{name}: published figure from {source}.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, help="also write the table as a markdown file")
    args = p.parse_args()
    text = table()
    print(text)
    if args.write:
        machine = f"{platform.node() or 'unnamed'}, {platform.processor() or platform.machine()}, no GPU"
        header = (f"# Projection vs published ({datetime.date.today().isoformat()})\n\n"
                  f"PROJECTION, not a measurement: `python benchmarks/plan_vs_published.py` on {machine} "
                  "(the plan needs no GPU: FLOPs counted on the meta device, published peak throughput at an "
                  "assumed efficiency, bytes at the link's bandwidth). Projected times are denoising only; "
                  "published times are whole runs.\n\n")
        args.write.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
