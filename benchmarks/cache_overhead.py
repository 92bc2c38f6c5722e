"""What each cache kind's machinery costs, what skipping buys, and what its state holds per rank.

For every kind in caching/registry.py's KINDS, on the tiny random-weight Wan (CPU):

1. Overhead: the kind configured never to skip, against no cache (same engine, renders
   interleaved; ratio of median step times, first step excluded).
2. Forced skip shares (about 25 %, 50 %, 75 % of the decisions skip): settings that make the kind
   skip on a fixed schedule (thresholds so high that every unforced decision skips, and the kind's
   own limits — warm-up, max_consecutive_skips, max_skip_steps, retention, a static step_mask,
   PAB's skip ranges — set where compute happens). The achieved share is counted from
   `result.cache_decisions`. Mean step time (every step) against the ideal: the no-cache mean
   step time x (1 - the skipped share x the share of a no-cache step spent in the part a skip
   leaves out, measured by forward hooks in a no-cache render). The part is the blocks a skipped
   forward does not run: every block (MagCache, TeaCache, TaylorSeer in its lite form), all but
   the first (First-Block Cache), the L − Fn − Bn middle blocks (DBCache), the whole transformer
   forward (EasyCache), and for PAB each attention kind's modules (self, cross) with that kind's
   skipped share.
3. Cache state per rank at real shapes (analytic, bf16): see `state_bytes`.
4. The agreement all-reduce: microseconds per `Agreement.ratio` call over a 2-rank gloo group.

    python benchmarks/cache_overhead.py [--steps 8 --repeats 8 --threads 1] [--write benchmarks/results/DATE-cache-overhead-cpu.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unison.caching import registry
from unison.caching.agree import Agreement
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, RunConfig, SamplingConfig
from unison.engine.render import Engine

NEVER = 1e9
"""A threshold every measured change stays below: each unforced decision skips."""
SHARES = (0.25, 0.5, 0.75)
"""The skip shares forced (of a run's steps, per branch)."""
FRONT, BACK = 1, 1
"""DBCache's Fn and Bn here (the tiny Wan has 3 blocks: one is cached)."""


# -- settings per kind ------------------------------------------------------------------------

def never_skips(kind: str) -> CacheConfig:
    """Each kind set never to skip (as tests/test_cache_battery.py's SETTINGS)."""
    return {"fbcache": CacheConfig(kind="fbcache", threshold=0.0),
            "pab": CacheConfig(kind="pab", self_skip_range=None, cross_skip_range=None),
            "magcache": CacheConfig(kind="magcache", mag_ratios=(1.0, 0.99), max_skip_steps=0),
            "teacache": CacheConfig(kind="teacache", coefficients=(0, 0, 0, 1, 0), threshold=0.0),
            "dbcache": CacheConfig(kind="dbcache", threshold=0.0, front_blocks=FRONT, back_blocks=BACK),
            "easycache": CacheConfig(kind="easycache", threshold=0.0),
            "taylorseer": CacheConfig(kind="taylorseer", interval=1, lite=True)}[kind]


def forced(kind: str, share: float, steps: int, timesteps: list[float]) -> CacheConfig:
    """A setting under which `kind` skips `share` of the steps of each branch on a fixed schedule
    (exact for 8 steps; the achieved share is what the table reports). Step 0 always computes.
    Skipped steps of 8: 25 %: 4 and 6 (PAB: 5 and 7); 50 %: the odd steps (EasyCache, which
    computes steps 0 and 1: 2, 3, 5, 6); 75 %: all but 0 and 4 (EasyCache: all but 0 and 1)."""
    warm = steps // 2 if share == 0.25 else 1
    limit = {0.25: 1, 0.5: 1, 0.75: 3}[share]
    if kind == "fbcache":
        return CacheConfig(kind="fbcache", threshold=NEVER, warmup_steps=warm, max_consecutive_skips=limit)
    if kind == "teacache":
        return CacheConfig(kind="teacache", coefficients=(0, 0, 0, 1, 0), threshold=NEVER, warmup_steps=warm,
                           compute_last=False, max_consecutive_skips=limit)
    if kind == "magcache":  # ratios of exactly 1: no error accumulates; max_skip_steps and retention gate
        return CacheConfig(kind="magcache", mag_ratios=(1.0, 1.0), threshold=1.0, max_skip_steps=limit,
                           retention_ratio=(warm / steps if share == 0.25 else 0.0))
    if kind == "dbcache":  # a static mask: 0 skips unconditionally
        period = {0.25: None, 0.5: 2, 0.75: 4}[share]
        mask = tuple(1 if (i < warm or i % 2) else 0 for i in range(steps)) if period is None \
            else tuple(int(i % period == 0) for i in range(steps))
        return CacheConfig(kind="dbcache", threshold=NEVER, front_blocks=FRONT, back_blocks=BACK, step_mask=mask,
                           mask_policy="static")
    if kind == "easycache":  # steps 0 and 1 always compute (the transformation rate needs two)
        easy_warm, easy_limit = {0.25: (warm, 1), 0.5: (0, 2), 0.75: (0, steps)}[share]
        return CacheConfig(kind="easycache", threshold=NEVER, warmup_steps=easy_warm, compute_last=False,
                           max_consecutive_skips=easy_limit)
    if kind == "taylorseer":  # the lite form (a predicted step runs no block); diffusers' schedule:
        # compute iff step < warm-up or (step - warm-up - 1) % interval == 0
        warmup, interval = {0.25: (4, 2), 0.5: (1, 2), 0.75: (1, 8)}[share]  # skips 4, 6 / odd / all but 0, 2
        return CacheConfig(kind="taylorseer", lite=True, warmup_steps=warmup, interval=interval)
    if kind == "pab":  # every attention call counts; the window (strictly inside) sets where reuse may happen
        every = dict(self_timestep_min=-1.0, self_timestep_max=1001.0, cross_timestep_min=-1.0,
                     cross_timestep_max=1001.0)
        if share == 0.25:  # reuse every other call over the second half of the steps
            top = timesteps[warm - 1]
            every.update(self_timestep_max=top, cross_timestep_max=top)
        skip = 4 if share == 0.75 else 2
        return CacheConfig(kind="pab", self_skip_range=skip, cross_skip_range=skip, **every)
    raise ValueError(f"no forced settings for cache kind {kind!r}: add them here")


# -- measured ---------------------------------------------------------------------------------

def _steps(result) -> list[float]:
    return [r.seconds for r in result.loop.steps]


class PartTimes:
    """Seconds spent in the transformer, each block and each attention kind during a render, from
    forward hooks (CPU: the ops run synchronously)."""

    def __init__(self, engine: Engine):
        transformer = engine.pipe.transformer
        self.blocks = [b for attr in engine.plan.spec.block_lists for b in getattr(transformer, attr)]
        attentions = engine.plan.spec.attention_modules(transformer)
        self.parts = {"transformer": [transformer], **{f"block {i}": [b] for i, b in enumerate(self.blocks)},
                      **{f"{kind} attention": modules for kind, modules in attentions.items()}}
        self.seconds = dict.fromkeys(self.parts, 0.0)
        self._handles, self._start = [], {}

    def __enter__(self):
        for name, modules in self.parts.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._pre(name, m)))
                self._handles.append(m.register_forward_hook(self._post(name, m)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _pre(self, name, module):
        def hook(*_):
            self._start[id(module)] = time.perf_counter()
        return hook

    def _post(self, name, module):
        def hook(*_):
            self.seconds[name] += time.perf_counter() - self._start.pop(id(module))
        return hook


def _saved_seconds(kind: str, part: dict[str, float], decisions: list[tuple], blocks: int) -> float:
    """Seconds per step the ideal leaves out: the skipped share of the part a skip removes."""
    def share(what=None) -> float:
        chosen = [d for d in decisions if what is None or d[2] == what]
        return sum(not d[3] for d in chosen) / len(chosen)

    block = [part[f"block {i}"] for i in range(blocks)]
    if kind == "pab":
        return sum(share(what) * part[f"{what} attention"] for what in ("self", "cross"))
    stack = {"fbcache": block[1:], "dbcache": block[FRONT:blocks - BACK], "magcache": block,
             "teacache": block, "easycache": [part["transformer"]], "taylorseer": block}
    if kind not in stack:
        raise ValueError(f"no ideal for cache kind {kind!r}: say which part a skip leaves out")
    return share() * sum(stack[kind])


def measured(args) -> tuple[list[str], dict]:
    sampling = SamplingConfig(prompt="a red panda", negative_prompt="blurred", height=args.height, width=args.width,
                              frames=args.frames, steps=args.steps, guidance=5.0, max_sequence_length=16)
    base = RunConfig(model=ModelConfig(family="wan"), sampling=sampling,
                     output=OutputConfig(decode=False, progress=False))
    engine = Engine.from_config(base)
    warm = engine.render(base)  # first render: lazy initialisation, not timed
    timesteps = [r.timestep for r in warm.loop.steps]
    kinds = list(registry.KINDS)
    configs = {"none": base, **{kind: dataclasses.replace(base, cache=never_skips(kind)) for kind in kinds},
               **{(kind, share): dataclasses.replace(base, cache=forced(kind, share, args.steps, timesteps))
                  for kind in kinds for share in SHARES}}
    steps = {name: [] for name in configs}
    decisions = {}
    parts: list[dict[str, float]] = []
    for _ in range(args.repeats):  # interleaved: a load change on the shared machine hits every setting alike
        with PartTimes(engine) as timer:
            timed = sum(_steps(engine.render(base)))
        parts.append({k: v / timed for k, v in timer.seconds.items()})  # shares of that render's step time
        for name, config in configs.items():
            result = engine.render(config)
            steps[name].append(_steps(result))
            if name != "none":
                decisions[name] = result.cache_decisions["transformer"]

    def median_step(name):  # first step excluded
        return statistics.median(statistics.median(s[1:]) for s in steps[name])

    def mean_step(name):  # every step (the skips sit at fixed steps): each step's median over the rounds
        return statistics.fmean(statistics.median(column) for column in zip(*steps[name]))

    none_median, none_mean = median_step("none"), mean_step("none")
    # Each part's median share of a no-cache step, in seconds of the no-cache mean step.
    part = {k: statistics.median(p[k] for p in parts) * none_mean for k in parts[0]}
    blocks = sum(k.startswith("block ") for k in part)

    lines = ["## Overhead, never skipping (measured)", "",
             "| cache | setting | median s/step | ratio to no cache | decisions that skipped |", "|---|---|---|---|---|",
             f"| none | | {none_median:.4f} | 1.000 | |"]
    for kind in kinds:
        c = never_skips(kind)
        shown = ", ".join(f"{f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c)
                          if f.name not in ("kind", "verify") and getattr(c, f.name) != f.default)
        skipped = sum(not d[3] for d in decisions[kind])
        lines.append(f"| {kind} | {shown} | {median_step(kind):.4f} | {median_step(kind) / none_median:.3f} | "
                     f"{skipped} of {len(decisions[kind])} |")

    per_block = [part[f"block {i}"] for i in range(blocks)]
    total, each = sum(per_block), " + ".join(f"{t:.4f}" for t in per_block)
    lines += ["", "## Forced skip shares: measured against ideal", "",
              f"No-cache parts of a step (measured by forward hooks: median share of the timed render's step time over "
              f"{args.repeats} renders, shown in seconds of the no-cache mean step): "
              f"transformer {part['transformer']:.4f} s ({part['transformer'] / none_mean:.0%} of the mean step "
              f"{none_mean:.4f} s), blocks {total:.4f} s ({each}), "
              f"self-attention {part['self attention']:.4f} s, cross-attention {part['cross attention']:.4f} s.", "",
              "| cache | target | skipped (achieved) | part a skip leaves out | measured mean s/step | ideal s/step | "
              "measured / ideal | saved vs no cache: measured / ideal |", "|---|---|---|---|---|---|---|---|"]
    left_out = {"fbcache": f"blocks 2-{blocks}", "dbcache": f"blocks {FRONT + 1}-{blocks - BACK} (Fn {FRONT}, Bn {BACK})",
                "magcache": "all blocks", "teacache": "all blocks", "easycache": "transformer forward",
                "taylorseer": "all blocks (lite form)",
                "pab": "self/cross attention"}
    for kind in kinds:
        for share in SHARES:
            d = decisions[(kind, share)]
            skipped = sum(not x[3] for x in d)
            mean = mean_step((kind, share))
            ideal = none_mean - _saved_seconds(kind, part, d, blocks)
            saved = (none_mean - mean) / (none_mean - ideal) if none_mean > ideal else float("nan")
            lines.append(f"| {kind} | {share:.0%} | {skipped / len(d):.1%} ({skipped} of {len(d)} "
                         f"{'attention calls' if kind == 'pab' else 'forwards'}) | {left_out.get(kind, '?')} | "
                         f"{mean:.4f} | {ideal:.4f} | {mean / ideal:.3f} | {saved:.2f} |")
    info = dict(none_mean=none_mean, blocks=blocks)
    return lines, info


# -- analytic ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What sets a cache's state size on one rank."""

    name: str
    tokens: int
    """Video tokens (split over the ranks by the sequence split)."""
    text: int
    """Text tokens carried whole on every rank beside the video (HunyuanVideo), else 0."""
    dim: int
    blocks: int
    attentions: int
    """Attention modules PAB keeps an output of (Wan: self and cross per block; HunyuanVideo: the
    joint attention of every dual- and single-stream block)."""
    latent: int
    """Elements of the latents (whole on every rank)."""
    contexts: int
    """Guidance branches on each rank, each with its own state."""
    teacache_split: bool
    """TeaCache's indicator is split with the tokens (HunyuanVideo: the modulated image tokens);
    else it is the timestep modulation, 6 x dim."""
    outputs: int
    """Hidden-size outputs per token TaylorSeer's full form predicts (Wan: self-, cross-attention
    and MLP per block; HunyuanVideo: attention and MLP per dual-stream block, for the image and
    the text tokens, and each single-stream block's output)."""
    projected: int = 64
    """Values per token of the final projection (TaylorSeer-Lite's prediction): 16 channels x 1x2x2."""


BF16 = 2
SHAPES = [
    Shape("Wan 2.1 14B 720x1280x81, CFG", tokens=21 * 45 * 80, text=0, dim=5120, blocks=40, attentions=80,
          latent=16 * 21 * 90 * 160, contexts=2, teacache_split=False, outputs=3 * 40),
    Shape("Wan 2.1 1.3B 480x832x81, CFG", tokens=21 * 30 * 52, text=0, dim=1536, blocks=30, attentions=60,
          latent=16 * 21 * 60 * 104, contexts=2, teacache_split=False, outputs=3 * 30),
    Shape("HunyuanVideo 720x1280x129, one branch, 256 text tokens", tokens=33 * 45 * 80, text=256, dim=3072,
          blocks=60, attentions=60, latent=16 * 33 * 90 * 160, contexts=1, teacache_split=True,
          outputs=2 * 20 + 40),
]
"""Wan 2.1 (diffusers' WanTransformer3DModel: 14B 40 x 5120, 1.3B 30 x 1536; patch 1x2x2 on the
VAE's 4x8x8 latent grid) and HunyuanVideo (20 dual + 40 single blocks x 3072, embedded guidance: one
branch), as benchmarks/checkpoint_cost.py counts them."""


def state_bytes(kind: str, s: Shape, ranks: int) -> int:
    """One rank's cache state (bf16) under a sequence split over `ranks` (Ulysses, Ring), both
    guidance branches on the rank; CFG parallelism would halve the contexts.
      fbcache, dbcache: per context the deciding residual (video shard) and the reused one (video
        shard, and HunyuanVideo's text stream).
      magcache: per context the stack's residual (video shard; the text passes through).
      teacache: per context the stack's residual and the previous indicator (HunyuanVideo: the
        modulated image tokens of the shard; Wan: the 6 x dim timestep modulation).
      pab: per context and attention module its last output (video shard, and text for HunyuanVideo).
      easycache: latent-sized tensors, whole on every rank: the conditional branch's previous
        input, last computed input and output and its reused difference, and the unconditional
        branch's reused difference (4 + 1 with CFG, 4 with one branch; an upper bound: after a
        computed step the previous and last computed inputs are one tensor).
      taylorseer (full form, first order): per context two factors of every predicted output
        (video shard, and HunyuanVideo's text); `taylorseer-lite`: two of the final projection's
        output (64 values per token of the shard)."""
    shard = -(-s.tokens // ranks)
    per_context = {
        "fbcache": (2 * shard + s.text) * s.dim,
        "dbcache": (2 * shard + s.text) * s.dim,
        "magcache": shard * s.dim,
        "teacache": shard * s.dim + (shard * s.dim if s.teacache_split else 6 * s.dim),
        "pab": s.attentions * (shard + s.text) * s.dim,
        "taylorseer": 2 * s.outputs * (shard + s.text) * s.dim,
        "taylorseer-lite": 2 * shard * s.projected,
    }
    if kind == "easycache":
        return (4 + (s.contexts - 1)) * s.latent * BF16
    if kind not in per_context:
        raise ValueError(f"no state count for cache kind {kind!r}: add it to state_bytes")
    return s.contexts * per_context[kind] * BF16


def memory_table() -> list[str]:
    ranks = (1, 2, 4, 8)
    lines = ["", "## Cache state per rank at real shapes (analytic, bf16, GB = 1e9 bytes)", "",
             "| model | cache | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}" for r in ranks) + " |",
             "|---|---|" + "---|" * len(ranks)]
    for s in SHAPES:
        for kind in [*registry.KINDS, "taylorseer-lite"]:
            lines.append(f"| {s.name} | {kind} | " + " | ".join(f"{state_bytes(kind, s, r) / 1e9:.3f}" for r in ranks)
                         + " |")
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


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine, a second OpenMP thread waiting for a busy core "
                        "stalls whole steps)")
    p.add_argument("--write", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps != 8:
        print("note: the forced schedules are exact for 8 steps; the achieved shares are reported", file=sys.stderr)
    start, load_start = time.perf_counter(), _load()
    lines, _ = measured(args)
    lines += memory_table() + ["", "## Agreement all-reduce (measured)"] + agreement_cost()
    elapsed, load_end = time.perf_counter() - start, _load()
    text = "\n".join(lines)
    print(text)
    print(f"\n{elapsed:.0f} s; load average (1, 5, 15 min) {load_start} at start, {load_end} at end")
    if args.write:
        command = "python benchmarks/cache_overhead.py " + " ".join(sys.argv[1:])
        header = (f"# Cache kinds: overhead, skip savings and state memory ({datetime.date.today().isoformat()})\n\n"
                  f"Device: {_cpu()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}; torch "
                  f"{torch.__version__}. Command: `{command.strip()}` ({elapsed:.0f} s). Load average (1, 5, 15 min): "
                  f"{load_start} at start, {load_end} at end (a shared machine).\n\n"
                  f"Measured: tiny random-weight Wan (3 blocks, 4 heads x 12) at {args.height}x{args.width}x"
                  f"{args.frames}, {args.steps} steps, CFG (two forwards per step), float32; {args.repeats} "
                  "interleaved rounds (each: one no-cache render with part timers, then no cache, every kind "
                  "never skipping and every kind at each forced share), medians over the rounds. Overhead: "
                  "median step time, first step excluded. Forced shares: mean over every step (the skips sit at "
                  "fixed steps) of each step's median over the rounds. Ideal: the no-cache mean step x (1 - the skipped share x the "
                  "measured share of a no-cache step spent in the part a skip leaves out) (see the module docstring); "
                  "the last column is the saving achieved over the saving the ideal allows. With 3 blocks a "
                  "First-Block Cache skip still runs 1 of 3 blocks and a DBCache (Fn 1, Bn 1) skip 2 of 3, so "
                  "their savings are small here; at 40 blocks they are nearly the whole stack's.\n\n"
                  "Analytic: state sizes from the shapes (`state_bytes` says what is counted), not measured.\n\n")
        args.write.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
