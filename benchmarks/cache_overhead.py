"""What the cache machinery costs and what skipping buys, on one device.

1. Overhead: First-Block Cache and PAB configured never to skip, against no cache (same engine,
   renders interleaved, ratio of median step times).
2. First-Block Cache at forced skip rates (0 %, 25 %, 50 %): the decision is forced (the agreed
   metric is replaced by 0 or inf on a fixed schedule), and the step time is compared with the
   ideal (1 - rate x (blocks - 1) / blocks) x the no-cache time.
3. The agreement all-reduce: microseconds per `Agreement.ratio` call over a 2-rank gloo group.

    python benchmarks/cache_overhead.py [--height 256 --width 256 --frames 17 --steps 8] [--write FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unison.caching.agree import Agreement
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine


def _step_median(engine: Engine, config: RunConfig) -> float:
    result = engine.render(config)
    return statistics.median(r.seconds for r in result.loop.steps[1:])


def _forced(rate: float, steps: int):
    """Agreement.ratio replacement: skip (0.0) on a fixed share of the comparable steps."""
    comparable = steps - 1
    skip_steps = {1 + round(i / rate) for i in range(round(comparable * rate))} if rate else set()
    calls = {"n": 0}

    def ratio(self, numerator, denominator):
        step = 1 + calls["n"] // 2  # two branches per step
        calls["n"] += 1
        return 0.0 if step in skip_steps else float("inf")

    return ratio


def overhead_and_skips(args) -> list[str]:
    sampling = SamplingConfig(prompt="a red panda", negative_prompt="blurred", height=args.height, width=args.width,
                              frames=args.frames, steps=args.steps, guidance=5.0, max_sequence_length=16)
    base = RunConfig(model=ModelConfig(family="wan"), sampling=sampling,
                     output=OutputConfig(decode=False, progress=False))
    engine = Engine.from_config(base)
    configs = {"none": base,
               "fbcache never skips": dataclasses.replace(base, cache=CacheConfig(kind="fbcache", threshold=0.0)),
               "pab never skips": dataclasses.replace(base, cache=CacheConfig(kind="pab", self_skip_range=None,
                                                                              cross_skip_range=None))}
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, config in configs.items():
            times[name].append(_step_median(engine, config))
    none = statistics.median(times["none"])
    lines = [f"| configuration | median s/step | ratio to no cache |", "|---|---|---|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.4f} | {statistics.median(values) / none:.3f} |")

    blocks = len(engine.pipe.transformer.blocks)
    lines += ["", f"| forced skip rate | mean s/step | ideal s/step | measured / ideal |", "|---|---|---|---|"]
    plain = engine.render(base).loop.steps
    none_mean = sum(r.seconds for r in plain) / len(plain)
    original = Agreement.ratio
    try:
        for rate in (0.0, 0.25, 0.5):
            Agreement.ratio = _forced(rate, args.steps)
            config = dataclasses.replace(base, cache=CacheConfig(kind="fbcache", threshold=0.5))
            result = engine.render(config)
            skipped = sum(1 for d in result.cache_decisions["transformer"] if not d[3])
            mean = sum(r.seconds for r in result.loop.steps) / len(result.loop.steps)
            actual_rate = skipped / (2 * args.steps)
            ideal = none_mean * (1 - actual_rate * (blocks - 1) / blocks)
            lines.append(f"| {actual_rate:.0%} ({skipped} of {2 * args.steps} forwards) | {mean:.4f} | "
                         f"{ideal:.4f} | {mean / ideal:.3f} |")
    finally:
        Agreement.ratio = original
    return lines


def _agree_worker(rank: int, world: int, port: int, calls: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    agreement = Agreement(group=dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=60)))
    num, den = torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    for _ in range(20):
        agreement.ratio(num, den)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        agreement.ratio(num, den)
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(f"{elapsed / calls * 1e6:.1f}")
    dist.destroy_process_group()


def agreement_cost(calls: int = 500) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "us")
        mp.start_processes(_agree_worker, args=(2, port, calls, out), nprocs=2, join=True, start_method="spawn")
        us = Path(out).read_text()
    return ["", "| agreement all-reduce (2 float64, 2 gloo ranks, loopback) | µs per decision |", "|---|---|",
            f"| Agreement.ratio | {us} |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", type=Path)
    args = p.parse_args()
    lines = overhead_and_skips(args) + agreement_cost()
    text = "\n".join(lines)
    print(text)
    if args.write:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        header = (f"# Cache machinery overhead and skip savings ({datetime.date.today().isoformat()})\n\n"
                  f"Device: {device}; torch {torch.__version__}. Tiny random-weight Wan (3 blocks, 4 heads x 12) "
                  f"at {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG (two forwards per step), "
                  f"float32. Command: `python benchmarks/cache_overhead.py`. Medians over {args.repeats} "
                  "interleaved renders, first step excluded. With 3 blocks a skipped forward still runs 1 of 3 "
                  "blocks, so a 50 % skip rate saves at most a third of the step.\n\n")
        args.write.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
