"""What a step checkpoint (engine/io/checkpoint.py) costs: bytes per rank at real shapes from shape
arithmetic, seconds to save and restore and the step-time overhead of `output.checkpoint_every`
measured at tiny shapes on this machine, and a projection of seconds per checkpoint at real shapes.

A rank's file holds every cache's state for this rank's sequence shard, the RNG state and small
metadata; rank 0's also the latents and the scheduler's state (the same on every rank: written
once, broadcast on resume). The analytic count below is checked against the files the engine writes at
tiny shapes (one rank, and Ulysses 2 for the per-shard cache state); the measured save includes
engine/io/writes.py's read-back check and fsync.

    python benchmarks/checkpoint_cost.py [--steps 20 --repeats 3] [--write benchmarks/results/DATE-checkpoint-cost-cpu.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from multirank import run_ranks  # noqa: E402

from unison.engine.io.checkpoint import Checkpoints, checkpoint_dir  # noqa: E402
from unison.engine.config import CacheConfig, ModelConfig, OutputConfig, ParallelConfig, RunConfig, SamplingConfig  # noqa: E402
from unison.engine.render import Engine  # noqa: E402

RNG_BYTES = 5056
"""torch.get_rng_state() on the CPU (a CUDA device adds 16 bytes)."""
MB, GB = 1e6, 1e9
DISKS = (2 * GB, 0.5 * GB)
"""The stated write bandwidths per rank of the projection: a local NVMe disk, a shared filesystem."""
SPACING_S = 0.1
"""Seconds between two timed saves (a tiny render's step takes about 0.05 s here)."""
CACHES = {"none": CacheConfig(), "fbcache": CacheConfig(kind="fbcache", threshold=0.0),
          "pab": CacheConfig(kind="pab", self_skip_range=2, self_timestep_min=0, self_timestep_max=1000,
                             cross_skip_range=2, cross_timestep_min=0, cross_timestep_max=1000)}
"""First-Block Cache that never skips and PAB over every step: their state is full from the first
step on (what they keep does not depend on how often they skip)."""


@dataclass(frozen=True)
class Workload:
    """What sets the size of one rank's checkpoint."""

    name: str
    latent: tuple[int, int, int, int]
    """Channels, frames, height, width of the latent grid."""
    patch: tuple[int, int, int]
    """Latent cells per token: frames, height, width."""
    dim: int
    """Hidden size: heads x head_dim."""
    attentions: int
    """Attention modules whose outputs PAB keeps (Wan: self and cross per block; HunyuanVideo:
    the joint attention of every dual- and single-stream block)."""
    text: int
    """Text tokens carried whole on every rank beside the video (HunyuanVideo's stream), else 0."""
    contexts: int
    """Guidance branches, each with its own cache state."""
    latent_bytes: int
    """Element size of the latents as the loop holds them: Wan's UniPC keeps float32 whatever the
    model dtype; HunyuanVideo's flow-match Euler casts each step's result to the model's dtype."""
    hidden_bytes: int
    """Element size of the blocks' activations (the model dtype)."""
    history: int
    """Latent-sized tensors of scheduler state: UniPC (solver_order 2) keeps 2 model outputs and
    the last sample; flow-match Euler none."""
    fixed: int
    """Scheduler tables and timesteps, and the RNG state (rank 0's file; the others hold the RNG)."""

    @property
    def tokens(self) -> int:
        _, t, h, w = self.latent
        return (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])

    def shard(self, ranks: int) -> int:
        """Video tokens per rank under a sequence split (Ulysses, Ring, displaced patches); padded."""
        return -(-self.tokens // ranks)

    def latents(self) -> int:
        return math.prod(self.latent) * self.latent_bytes

    def scheduler(self) -> int:
        return self.history * math.prod(self.latent) * 4  # UniPC's history is float32 like its latents

    def fbcache(self, ranks: int) -> int:
        """Per context: the first block's residual and the tail residual (video), and for
        HunyuanVideo the tail residual's text."""
        return self.contexts * (2 * self.shard(ranks) + self.text) * self.dim * self.hidden_bytes

    def pab(self, ranks: int) -> int:
        """Per context and attention module: its last output (video shard, and text for HunyuanVideo)."""
        return self.contexts * self.attentions * (self.shard(ranks) + self.text) * self.dim * self.hidden_bytes

    def cache(self, kind: str, ranks: int) -> int:
        return {"none": 0, "fbcache": self.fbcache(ranks), "pab": self.pab(ranks)}[kind]

    def total(self, kind: str, ranks: int, rank: int = 0) -> int:
        """One rank's file: its cache state and RNG; rank 0's also the latents and the scheduler's
        state (history and tables)."""
        mine = self.latents() + self.scheduler() + self.fixed if rank == 0 else RNG_BYTES
        return mine + self.cache(kind, ranks)


def unipc_fixed(steps: int, *, train: int = 1000, order: int = 2) -> int:
    """betas, alphas, alphas_cumprod, alpha_t, sigma_t, lambda_t (float32, one per training
    timestep), sigmas (steps + 1, float32), timesteps (int64), the timestep list (int64), and the RNG."""
    return 6 * train * 4 + (steps + 1) * 4 + steps * 8 + order * 8 + RNG_BYTES


def flow_fixed(steps: int) -> int:
    """Flow-match Euler's timesteps and sigmas (float32), and the RNG."""
    return steps * 4 + (steps + 1) * 4 + RNG_BYTES


def _grid(channels: int, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent grid of both families' VAEs: 4x temporal (first frame alone), 8x spatial."""
    return channels, (frames - 1) // 4 + 1, height // 8, width // 8


def real_workloads() -> list[Workload]:
    """Wan 2.1 14B (diffusers' WanTransformer3DModel defaults), Wan 2.1 1.3B (1536 = 12 x 128, 30
    blocks), HunyuanVideo (HunyuanVideoTransformer3DModel defaults, 256 text tokens); bf16 models."""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    def defaults(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    wan, hunyuan = defaults(WanTransformer3DModel.__init__), defaults(HunyuanVideoTransformer3DModel.__init__)
    assert (wan["num_attention_heads"] * wan["attention_head_dim"], wan["num_layers"], tuple(wan["patch_size"]),
            wan["in_channels"]) == (5120, 40, (1, 2, 2), 16)
    assert (hunyuan["num_attention_heads"] * hunyuan["attention_head_dim"], hunyuan["num_layers"],
            hunyuan["num_single_layers"], hunyuan["patch_size"], hunyuan["patch_size_t"],
            hunyuan["in_channels"]) == (3072, 20, 40, 2, 1, 16)
    text = defaults(HunyuanVideoPipeline.__call__)["max_sequence_length"]
    steps = 50
    wan_bf16 = dict(patch=(1, 2, 2), text=0, contexts=2, latent_bytes=4, hidden_bytes=2, history=3,
                    fixed=unipc_fixed(steps))
    return [
        Workload("Wan 2.1 14B 720x1280x81, CFG", _grid(16, 81, 720, 1280), dim=5120, attentions=2 * 40, **wan_bf16),
        Workload("Wan 2.1 1.3B 480x832x81, CFG", _grid(16, 81, 480, 832), dim=1536, attentions=2 * 30, **wan_bf16),
        Workload(f"HunyuanVideo 720x1280x129, one branch, {text} text tokens", _grid(16, 129, 720, 1280),
                 patch=(1, 2, 2), dim=3072, attentions=20 + 40, text=text, contexts=1, latent_bytes=2,
                 hidden_bytes=2, history=0, fixed=flow_fixed(steps)),
    ]


# -- measured ---------------------------------------------------------------------------------

def _config(family: str, args, cache: CacheConfig, folder: Path, *, steps: int, every: int = 0,
            parallel: ParallelConfig = ParallelConfig(), scale: int = 1) -> RunConfig:
    """The tiny preset at the benchmark's shape (`scale` times the height and width, and about
    `scale` times the frames)."""
    hunyuan = family == "hunyuanvideo"
    sampling = SamplingConfig(prompt="a red panda", negative_prompt="blurred", height=args.height * scale,
                              width=args.width * scale, frames=(args.frames - 1) * scale + 1, steps=steps,
                              guidance=5.0, true_cfg_scale=3.0 if hunyuan else None,
                              max_sequence_length=128 if hunyuan else 16)
    return RunConfig(model=ModelConfig(family=family), sampling=sampling, parallel=parallel, cache=cache,
                     output=OutputConfig(path=str(folder / "video.mp4"), decode=False, progress=False,
                                         checkpoint_every=every))


def tiny_workload(engine: Engine, config: RunConfig) -> Workload:
    """The analytic model at the tiny preset's own dimensions (float32 throughout)."""
    family, s = config.model.family, config.sampling
    t = engine.pipe.transformer.config
    hunyuan = family == "hunyuanvideo"
    patch = (t.patch_size_t, t.patch_size, t.patch_size) if hunyuan else tuple(t.patch_size)
    attentions = t.num_layers + t.num_single_layers if hunyuan else 2 * t.num_layers
    fixed = flow_fixed(s.steps) if hunyuan else unipc_fixed(s.steps)
    return Workload(f"tiny {family}", _grid(t.in_channels, s.frames, s.height, s.width), patch=patch,
                    dim=t.num_attention_heads * t.attention_head_dim, attentions=attentions,
                    text=s.max_sequence_length if hunyuan else 0, contexts=2, latent_bytes=4, hidden_bytes=4,
                    history=0 if hunyuan else 3, fixed=fixed)


def save_and_restore(engine: Engine, config: RunConfig, repeats: int, *, rank: int = 0, world: int = 1,
                     group=None) -> tuple[int, list[float], list[float]]:
    """Render (leaving the scheduler's and caches' state of the last step), then save it `repeats`
    times through Checkpoints and restore it as many: the file's bytes, save and restore seconds.
    Saves are spaced by SPACING_S, as steps space them in a render: back to back, each save's fsync
    also waits for the previous file's writeback."""
    latents = engine.render(config).latents
    every = dataclasses.replace(config, output=dataclasses.replace(config.output, checkpoint_every=1))
    checkpoints = Checkpoints.create(every, rank=rank, world_size=world, group=group)
    saves, restores = [], []
    for index in range(repeats):
        time.sleep(SPACING_S)
        started = time.perf_counter()
        checkpoints.save(index, latents, engine.pipe.scheduler, engine.caches)
        saves.append(time.perf_counter() - started)
    size = (checkpoint_dir(config.output) / f"rank{rank}.step{repeats}.pt").stat().st_size
    for _ in range(repeats):
        started = time.perf_counter()
        checkpoints.restore(engine.pipe.scheduler, engine.caches, engine.plan.device)
        restores.append(time.perf_counter() - started)
    checkpoints.remove()
    return size, saves, restores


def _ulysses_sizes(rank: int, world: int, args, folder: str) -> dict[str, tuple[int, int]]:
    """Each cache's file size on this rank under Ulysses 2, and the analytic count."""
    parallel = ParallelConfig(ulysses=world, timeout_s=60)
    out = {}
    for kind, cache in CACHES.items():
        config = _config("wan", args, cache, Path(folder) / kind, steps=4, parallel=parallel)
        engine = Engine.from_config(config, world_size=world)
        size, _, _ = save_and_restore(engine, config, 1, rank=rank, world=world,
                                      group=engine.runtime.groups.get("cfg_tokens"))
        out[kind] = (size, tiny_workload(engine, config).total(kind, world, rank))
    return out


def measure(args, folder: Path) -> tuple[list[str], float, float]:
    """Bytes and seconds per case, a line on how well the analytic count holds, and the save's
    fixed cost (the smallest file's median) and its rate per byte beyond it (from the largest file,
    Wan with PAB at twice the shape)."""
    lines = ["| case | cache | ranks | analytic B | on disk B | on disk / analytic | save s (median) | restore s (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    cases = [(family, kind, 1) for family in ("wan", "hunyuanvideo") for kind in CACHES] + [("wan", "pab", 2)]
    points = []
    for family, kind, scale in cases:
        config = _config(family, args, CACHES[kind], folder / f"{family}-{kind}-{scale}", steps=4, scale=scale)
        engine = Engine.from_config(config)
        size, saves, restores = save_and_restore(engine, config, args.saves)
        analytic = tiny_workload(engine, config).total(kind, 1)
        points.append((size, statistics.median(saves), analytic))
        s = config.sampling
        lines.append(f"| {family} {s.height}x{s.width}x{s.frames} | {kind} | 1 | {analytic} | {size} | "
                     f"{size / analytic:.3f} | {statistics.median(saves):.4f} | {statistics.median(restores):.4f} |")
    sizes = [(size, analytic) for size, _, analytic in points]
    for rank, files in enumerate(run_ranks(2, _ulysses_sizes, args, str(folder / "ulysses"))):
        for kind, (size, analytic) in files.items():
            sizes.append((size, analytic))
            lines.append(f"| wan {args.height}x{args.width}x{args.frames}, Ulysses 2, rank {rank} | {kind} | 2 | "
                         f"{analytic} | {size} | {size / analytic:.3f} | | |")
    worst = max(abs(size / analytic - 1) for size, analytic in sizes if size >= MB)
    smallest = min(sizes)
    lines += ["", f"Every file of 1 MB or more is within {100 * worst:.1f} % of the analytic count; the smallest "
              f"({smallest[0]} B) has {smallest[0] - smallest[1]} B more, torch.save's container (zip entries, "
              "pickled structure, the cache decision logs)."]
    (small, fixed_s, _), (large, large_s, _) = min(points), max(points)
    return lines, fixed_s, (large - small) / max(large_s - fixed_s, 1e-6)


def _render_timed(engine: Engine, config: RunConfig) -> tuple[float, float, list[float]]:
    """One render: its wall seconds, the seconds it spent saving checkpoints (from the
    "checkpointing" phase to that step's on_step, which the loop calls right after the save), and
    its step times."""
    spent, mark = [0.0], [None]

    def on_phase(phase: str, step: int, steps: int) -> None:
        if phase == "checkpointing":
            mark[0] = time.perf_counter()

    def on_step(record) -> None:
        if mark[0] is not None:
            spent[0] += time.perf_counter() - mark[0]
            mark[0] = None

    started = time.perf_counter()
    result = engine.render(config, on_phase=on_phase, on_step=on_step)
    return time.perf_counter() - started, spent[0], [r.seconds for r in result.loop.steps]


def overhead(args, folder: Path) -> list[str]:
    """Renders (decode off) with checkpoint_every off, 1, 5 and 10, interleaved. The overhead is
    each render's seconds saving checkpoints over its seconds in steps (median over the repeats):
    a ratio within one render, which the load other processes put on this shared machine moves
    less than it moves the difference between two renders' wall times (also given)."""
    lines = ["| cache | checkpoint_every | checkpoints written | median render s | median step s | "
             "median s per checkpoint | overhead % of step time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in ("none", "fbcache"):
        config = _config("wan", args, CACHES[kind], folder / "overhead" / kind, steps=args.steps)
        engine = Engine.from_config(config)
        engine.render(config)  # first render: lazy initialisation out of the timings
        runs = {every: [] for every in (0, 1, 5, 10)}
        for _ in range(args.repeats):
            for every in runs:
                runs[every].append(_render_timed(engine, dataclasses.replace(
                    config, output=dataclasses.replace(config.output, checkpoint_every=every))))
        for every, renders in runs.items():
            written = (args.steps - 1) // every if every else 0
            per = statistics.median(spent / written for _, spent, _ in renders) if written else 0.0
            share = statistics.median(spent / sum(steps) for _, spent, steps in renders)
            lines.append(f"| {kind} | {every or 'off'} | {written} | {statistics.median(w for w, _, _ in renders):.3f} | "
                         f"{statistics.median(t for _, _, steps in renders for t in steps):.4f} | {per:.4f} | "
                         f"{100 * share:.1f} |")
    return lines


# -- report -----------------------------------------------------------------------------------

def analytic_tables(workloads: list[Workload]) -> list[str]:
    lines = ["| workload | tokens | latents MB | scheduler history MB | ranks | First-Block Cache MB | PAB MB | "
             "rank 0, no cache MB | rank 0, FBCache MB | rank 0, PAB MB | other ranks, FBCache MB | other ranks, PAB MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in workloads:
        for ranks in (1, 2, 4, 8):
            others = (f"{w.total('fbcache', ranks, 1) / MB:,.0f} | {w.total('pab', ranks, 1) / MB:,.0f}"
                      if ranks > 1 else "- | -")
            lines.append(f"| {w.name} | {w.tokens} | {w.latents() / MB:.1f} | {w.scheduler() / MB:.1f} | {ranks} | "
                         f"{w.fbcache(ranks) / MB:,.0f} | {w.pab(ranks) / MB:,.0f} | {w.total('none', ranks) / MB:.1f} | "
                         f"{w.total('fbcache', ranks) / MB:,.0f} | {w.total('pab', ranks) / MB:,.0f} | {others} |")
    return lines


def projection(workloads: list[Workload]) -> list[str]:
    head = " | ".join(f"{kind}: s at {disk / GB:g} GB/s" for disk in DISKS for kind in CACHES)
    lines = [f"| workload | ranks | {head} |", "|---|---:|" + "---:|" * len(DISKS) * len(CACHES)]
    for w in workloads:
        for ranks in (1, 2, 4, 8):
            seconds = [w.total(kind, ranks) / disk for disk in DISKS for kind in CACHES]
            lines.append(f"| {w.name} | {ranks} | " + " | ".join(f"{t:.2f}" for t in seconds) + " |")
    return lines


def dtypes_in_bf16(args, folder: Path) -> list[str]:
    """What the loop holds when the model runs in bfloat16 (tiny presets, 3 steps)."""
    lines = []
    for family in ("wan", "hunyuanvideo"):
        config = _config(family, args, CACHES["fbcache"], folder / "bf16" / family, steps=3)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))
        engine = Engine.from_config(config)
        latents = engine.render(config).latents
        history = [t.dtype for t in getattr(engine.pipe.scheduler, "model_outputs", []) if t is not None]
        residual = engine.caches["transformer"].states["cond"].prev_residual.dtype
        lines.append(f"- {family} in bfloat16: latents {latents.dtype}, scheduler history "
                     f"{sorted({str(d) for d in history}) or 'none'}, First-Block Cache residual {residual}")
    return lines


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(args) -> str:
    workloads = real_workloads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measured, fixed_s, rate = measure(args, folder)
        overheads = overhead(args, folder)
        dtypes = dtypes_in_bf16(args, folder)
    return "\n".join([
        "## Real shapes: bytes per checkpoint per rank (analytic)", "",
        "Per rank, under a sequence split over `ranks` (Ulysses, Ring, displaced patches): the latents and the "
        "scheduler state are in rank 0's file alone; cache state is per sequence shard (HunyuanVideo's text "
        "stream is whole on every rank). Models in bfloat16 (Wan's latents and UniPC history float32, "
        "HunyuanVideo's latents bfloat16, cache state bfloat16), 50 steps. MB = 10^6 bytes. "
        "Scheduler tables, timesteps and RNG add about 30 kB.", "",
        *analytic_tables(workloads), "",
        "First-Block Cache's `head_output` (the first block's output) is read only in the forward that sets it "
        "and is dropped there (caching/fbcache.py: `_tail`, `computed`): it is neither kept between steps nor "
        "saved (until 2026-11-23 it was both: half as much again as the column). PAB keeps one output per attention module (Wan: self and cross in every block), "
        "inside its windows or not: its state, and its checkpoint, is the size of the table's PAB column. "
        "Wan 2.2 A14B at 720p is Wan 2.1 14B's row, with both experts' cache state once the low-noise expert has "
        "run (twice the cache columns). Under CFG parallelism a rank runs one guidance branch: half the cache "
        "columns.", "",
        "How the loop holds its tensors (checked here on the tiny presets in bfloat16):", "", *dtypes, "",
        "## Measured on this CPU at tiny shapes", "",
        f"Tiny random-weight presets (Wan: 3 blocks, 4 heads x 12; HunyuanVideo: 2 + 2 blocks, 4 heads x 10, 128 text "
        f"tokens), {args.height}x{args.width}x{args.frames}, float32, CFG (two contexts), 4 steps rendered, then "
        f"the last step's state saved through `Checkpoints.save` {args.saves} times, {SPACING_S} s apart (torch.save, "
        f"read back and compared, fsync, rename) and restored as often. The analytic count is the formula of the table above at "
        "these dimensions, fixed terms included.", "",
        *measured, "",
        f"A save here costs about {fixed_s * 1e3:.1f} ms (the smallest file's median) plus {rate / MB:.0f} MB/s "
        "beyond it (from the largest file). At these sizes a save is mostly the fsync, whose time varies with what "
        "else writes to this shared disk: single medians can be out of order with size. A restore is a torch.load "
        "from the page cache here (the file was just written); from a cold disk it reads at the disk's rate.", "",
        f"Step-time overhead: tiny Wan {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG, float32, "
        f"{args.repeats} interleaved repeats per setting (no checkpoint after the last step). Overhead: a render's "
        "seconds saving checkpoints over its seconds in steps, median over the repeats (a ratio within each "
        "render; the wall times of whole renders, also given, move with this shared machine's load by more "
        "than the saves take).", "",
        *overheads, "",
        "## Projection for real shapes: seconds per checkpoint per rank", "",
        "Projection, not measured: rank 0's bytes (first table; the largest file) over a stated write bandwidth per rank, "
        + " and ".join(f"{disk / GB:g} GB/s" for disk in DISKS) + ". Not counted: the copy from the GPU "
        "(`_cpu`, at PCIe rate) and engine/io/writes.py's read-back check (torch.load of the file and a bitwise "
        "compare, from the page cache). While a save runs a rank holds about twice the file in host memory (the "
        "copy, and the copy read back). Ranks sharing one node's disk share its bandwidth: the node writes ranks "
        "x the bytes. With `checkpoint_every` N, a step pays 1/N of these seconds on average.", "",
        *projection(workloads),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=20, help="steps of the overhead renders")
    p.add_argument("--repeats", type=int, default=3, help="interleaved renders per checkpoint_every")
    p.add_argument("--saves", type=int, default=7, help="saves and restores timed per case")
    p.add_argument("--write", type=Path)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " at the start"
    started = time.perf_counter()
    text = report(args)
    print(text)
    elapsed = time.perf_counter() - started
    if args.write:
        header = (f"# Step checkpoint cost (run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                  f"Device: {cpu_model()} (/proc/cpuinfo), {os.cpu_count()} cores, {torch.get_num_threads()} torch "
                  f"threads, CPU only; torch {torch.__version__}. "
                  f"Command: `python {' '.join(sys.argv)}` ({elapsed:.0f} s). Real-shape figures are computed "
                  "from shapes; the tiny-shape figures are measured.\n\n")
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        header += f"Load average (other engineers' work on the same cores): {args.load}, {load} at the end.\n\n"
        args.write.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
