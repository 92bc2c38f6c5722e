"""Bytes each rank sends per denoising step, per parallel layout, at real model shapes.

Shape arithmetic from unison.parallel.cost, which tests/test_parallel_engine.py checks against the
engine's own counters on every tiny N-rank parity run. No device is needed.

    python benchmarks/comm_bytes.py                 # print the table
    python benchmarks/comm_bytes.py --write FILE.md # also write it (benchmarks/results/...)
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from unison.parallel.cost import TransformerShape, bytes_per_step


def _latent(frames: int, height: int, width: int, channels: int = 16) -> tuple[int, int, int, int]:
    """(channels, latent frames, latent height, latent width) for a 4x temporal, 8x spatial VAE."""
    return channels, (frames - 1) // 4 + 1, height // 8, width // 8


def _shape(frames, height, width, *, heads, attentions, joint_text_tokens=0) -> TransformerShape:
    c, f, h, w = _latent(frames, height, width)
    return TransformerShape(video_tokens=f * (h // 2) * (w // 2), heads=heads, head_dim=128, attentions=attentions,
                            latent_elements=c * f * h * w, joint_text_tokens=joint_text_tokens)


# name, shape, guidance branches per step without / with true CFG
MODELS = [
    ("Wan 2.1 1.3B, 480x832x81", _shape(81, 480, 832, heads=12, attentions=30), 2),
    ("Wan 2.1 14B / 2.2 A14B, 720x1280x81", _shape(81, 720, 1280, heads=40, attentions=40), 2),
    ("HunyuanVideo, 720x1280x129 (true CFG for cfg layouts)",
     _shape(129, 720, 1280, heads=24, attentions=60, joint_text_tokens=256), 1),
]
LAYOUTS = [dict(ulysses=2), dict(ulysses=4), dict(ulysses=8), dict(ring=2), dict(ring=4), dict(ring=8),
           dict(ulysses=2, ring=2), dict(ulysses=4, ring=2), dict(cfg=2), dict(cfg=2, ulysses=2),
           dict(cfg=2, ulysses=4), dict(cfg=2, ulysses=2, ring=2)]
BANDWIDTHS = (("NVLink 450 GB/s", 450e9), ("IB 50 GB/s", 50e9))


def _name(layout: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in layout.items())


def table() -> str:
    lines = []
    for title, shape, branches in MODELS:
        lines += [f"### {title}", "",
                  f"{shape.video_tokens} video tokens, {shape.heads} heads x {shape.head_dim}, "
                  f"{shape.attentions} attentions per forward"
                  + (f", {shape.joint_text_tokens} text tokens in joint attention" if shape.joint_text_tokens else "")
                  + ", bf16.", "",
                  "| layout | ranks | all-to-all MiB | ring p2p MiB | all-gather MiB | total MiB | "
                  + " | ".join(f"ms at {b}" for b, _ in BANDWIDTHS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(BANDWIDTHS)]
        for layout in LAYOUTS:
            ranks = layout.get("ulysses", 1) * layout.get("ring", 1) * layout.get("cfg", 1)
            if shape.heads % layout.get("ulysses", 1):
                lines.append(f"| {_name(layout)} | {ranks} | heads not divisible | | | | " + "| " * len(BANDWIDTHS))
                continue
            sent = bytes_per_step(shape, **layout, branches=2 if layout.get("cfg", 1) > 1 else branches)
            total = sum(sent.values())
            cells = [f"{sent.get(k, 0) / 2**20:,.1f}" for k in ("all_to_all", "ring_p2p", "all_gather")]
            times = [f"{total / bw * 1e3:,.1f}" for _, bw in BANDWIDTHS]
            lines.append(f"| {_name(layout)} | {ranks} | " + " | ".join(cells) + f" | {total / 2**20:,.1f} | "
                         + " | ".join(times) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, help="also write the table as a markdown file")
    args = p.parse_args()
    text = table()
    print(text)
    if args.write:
        header = (f"# Bytes sent per denoising step per rank ({datetime.date.today().isoformat()})\n\n"
                  "Device: none (shape arithmetic, `python benchmarks/comm_bytes.py`). The formula is "
                  "`unison.parallel.cost.bytes_per_step`; tests/test_parallel_engine.py asserts it equals "
                  "the engine's counters on every tiny N-rank run (Wan 2.1, Wan 2.2, HunyuanVideo; "
                  "ulysses 2/4, ring 2/4, ulysses 2 x ring 2, cfg 2, cfg 2 x ulysses 2). Times are "
                  "bytes / bandwidth, a lower bound that ignores latency and overlap, not a measurement.\n\n"
                  "Per step with CFG: Wan runs two branches (both on each rank, or one per cfg half); "
                  "HunyuanVideo runs one (embedded guidance), two in the cfg layouts (true CFG).\n\n")
        args.write.write_text(header + text)


if __name__ == "__main__":
    main()
