"""The GPU suite: one command that shows what unison does on a real GPU within a time budget,
and keeps every row it measured even when it is killed, runs out of memory or runs out of time.

    python benchmarks/gpu_suite.py --out D --budget 480   # on a GPU: real sizes, bf16
    python benchmarks/gpu_suite.py --smoke                # the same code at tiny sizes on the CPU

Results: `<out>/<date>-gpu-suite-<device>.md` (a table per section; `unison plan` calibrates from
it) and a `.jsonl` beside it, one JSON object per row. Both are on disk as soon as a row is
measured: the markdown rewritten whole and renamed into place, then the JSON line appended and fsynced
(a row in the JSON lines is in the markdown too), so a suite killed mid-way leaves every finished row readable. `--smoke` writes into a new
temporary folder unless `--out` says where (it never writes into the checkout).

Sections, in order of value per second (`--sections` picks some, by key):
1. `tests`: the `gpu`-marked tests (`pytest -m gpu -rfEs`; with --smoke only collected); the
   pytest output is kept beside the result file.
2. `parity`: each text-to-video family's tiny model rendered by the engine and by diffusers'
   own pipeline in bfloat16 on the device, same weights and seed: the latents' relative error.
3. `forward`: one transformer forward at real size with random weights in bf16: Wan 2.1 1.3B at
   480x832x81; the per-rank share of Wan 14B at 720x1280x81, HunyuanVideo 1.5 at 720x1280x121,
   HunyuanVideo at 720x1280x129 and SkyReels-V2 14B at 720x1280x97 for 1, 2, 4 and 8 ranks. In
   that order: at the planner's assumed 45% of an H100's peak they need about 300 s, more than
   the section's limit, and SkyReels-V2 (Wan 14B's blocks; `unison plan` calibrates from the
   others) comes last. The inputs are those the family declares for the planner (text padded to
   its full length, every text token valid), filled with noise on the device. A rank's share is
   simulated on the one GPU by running the engine's own Ulysses attention with its collectives
   replaced by shape-preserving stand-ins (the all-to-all returns the rank's own chunk, the
   all-gather repeats it): every matmul and attention has the exact shape one rank of N computes
   (its 1/N of the tokens in the projections and MLPs, all tokens at 1/N of the heads in
   attention); only the communication is left out, and it is printed beside as bytes
   (parallel/cost.py) and a projection at a stated link bandwidth. The one-rank row runs through
   the same processors (a group of one), so every row of a model uses the same attention kernel
   (diffusers' own HunyuanVideo processor passes a mask, which takes torch's memory-efficient
   kernel instead of the flash kernel the shares use).
4. `compile`: eager vs compiled (model.compile=blocks): compile time and step time, Wan 1.3B.
5. `caches`: each cache's overhead with settings that never skip (First-Block Cache threshold 0,
   PAB without skip ranges), Wan 1.3B at 480p, against no cache.
6. `lora`: LoRA fusion on Wan 14B's blocks (random weights on the device, random rank-64 LoRAs
   on every attention and MLP layer): the first fuse, a switch to a LoRA not read before, one
   between two read before, back to none; and, for comparison, the host-to-device copy of the same
   weights that any reload makes (no disk read counted).
7. `vae`: VAE decode (Wan 2.1 VAE, random weights): time and peak memory at 480p and 720p.

Budgets: a section starts only when the time left of `--budget` covers its estimate (else it is
recorded as skipped, with the reason), and runs under its own limit (its cap, or the time left if
less); a section that reaches its limit keeps its finished rows and records the limit. A failure
in a row (out of memory while building a model or warming up, a missing package) is that row's
result: the memory is freed and the suite goes on.
Times are CUDA-event times of the compute stream (median of the timed runs, after a warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

from compile_blocks import first_call, timed  # noqa: E402 - benchmarks/ is on the path (script or test)
from unison.engine.caches import apply_caches
from unison.engine.config import CacheConfig
from unison.engine.models import SPECS, get_spec
from unison.engine.planner.model import forward_inputs, patch_size
from unison.parallel import attention as attention_module
from unison.parallel import sequence as sequence_module
from unison.parallel.attention import AttentionGroups
from unison.parallel.cost import TransformerShape, bytes_per_step
from unison.parallel.sequence import SequenceShard, apply_sequence_parallel

ROOT = Path(__file__).resolve().parent.parent

NVLINK_GBPS = 450.0
"""Per-direction NVLink 4 bandwidth of an H100 SXM (GB/s) for the communication projection."""

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)

FORWARD_TITLE = "one forward, per-rank share of Ulysses N (compute only)"
"""engine/planner/hardware.py reads this section's table to calibrate `unison plan`."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str
    config: dict | None
    """The transformer's constructor arguments (real size), or None for the tiny preset's."""
    latents: tuple[int, ...]
    """(batch, channels, latent frames, latent height, latent width); the transformer's
    in_channels stand in for the channels."""
    text_tokens: int
    ranks: tuple[int, ...]


def real_cases() -> list[Case]:
    return [
        Case("Wan 2.1 1.3B 480x832x81", "wan", {**WAN_COMMON, **WAN_1_3B}, (1, 16, 21, 60, 104), 512, (1,)),
        Case("Wan 2.1 14B 720x1280x81", "wan", {**WAN_COMMON, **WAN_14B}, (1, 16, 21, 90, 160), 512, (1, 2, 4, 8)),
        # Published shape (engine/models/hunyuan_video15/published.py); its VAE compresses 16x in space
        # and 4x in time: 121 frames are 31 latent frames. The Qwen prompt padded to 1000 tokens (its
        # inputs add the glyph's 256 and the image's 729).
        Case("HunyuanVideo 1.5 720x1280x121", "hunyuanvideo1.5", _published("hunyuanvideo1.5-720p"),
             (1, 65, 31, 45, 80), 1000, (1, 2, 4, 8)),
        Case("HunyuanVideo 720x1280x129", "hunyuanvideo", {}, (1, 16, 33, 90, 160), 256, (1, 2, 4, 8)),
        # Published shape (engine/models/skyreels_v2/published.py); 97 frames: 25 latent frames.
        Case("SkyReels-V2 14B 720x1280x97", "skyreels-v2", _published("skyreels-v2-14b-720p"), (1, 16, 25, 90, 160),
             512, (1, 2, 4, 8)),
        # One diffusion-forcing window at 720P (base_num_frames 121: 31 latent frames), a timestep per
        # frame; a long video is windows x rows of these (engine/windows.py).
        Case("SkyReels-V2 DF 14B 720x1280x121", "skyreels-v2-df", _published("skyreels-v2-df-14b-720p"),
             (1, 16, 31, 90, 160), 512, (1, 2, 4, 8)),
    ]


def _published(name: str) -> dict:
    """A published checkpoint's transformer constructor arguments (its family folder lists them)."""
    from unison.engine.models import checkpoints

    return dict(checkpoints()[name][1].components["transformer"][2])


def smoke_cases() -> list[Case]:
    return [
        Case("tiny Wan", "wan", None, (1, 16, 3, 8, 8), 16, (1, 2, 4)),
        Case("tiny HunyuanVideo", "hunyuanvideo", None, (1, 16, 3, 8, 8), 32, (1, 2)),
        Case("tiny HunyuanVideo 1.5", "hunyuanvideo1.5", None, (1, 9, 3, 8, 8), 16, (1, 2)),
        Case("tiny SkyReels-V2 DF", "skyreels-v2-df", None, (1, 16, 3, 8, 8), 16, (1, 2)),
    ]


def build_transformer(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights; real-size models are built directly on the device (no CPU copy)."""
    if case.config is None:
        transformer = get_spec(case.family).build_tiny(0).transformer
    else:
        import diffusers

        cls = getattr(diffusers, get_spec(case.family).transformer_class)
        with torch.device(device):
            transformer = cls(**case.config)
    return transformer.to(device=device, dtype=dtype).eval()


FIXED = {"timestep": 500.0, "guidance": 6000.0}
"""Inputs given one value rather than noise: a mid-schedule timestep, and embedded guidance 6.0
as HunyuanVideo's pipeline passes it (x 1000)."""


def inputs(case: Case, transformer, device: torch.device, dtype: torch.dtype) -> dict:
    """The forward's arguments as its family declares them (the planner's, engine/planner/model.py
    forward_inputs), made on the device and filled there: every mask with ones (every text token
    valid), the FIXED ones with their value, any other floating tensor with seeded noise."""
    b, _, f, h, w = case.latents
    config = dict(transformer.config)
    hidden_states = torch.empty(b, config["in_channels"], f, h, w, device=device, dtype=dtype)
    kwargs = forward_inputs(get_spec(case.family), config, hidden_states, case.text_tokens, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if "mask" in name:
            value.fill_(1)
        elif name in FIXED:
            value.fill_(FIXED[name])
        elif value.is_floating_point():
            value.normal_(generator=g)
        else:
            raise ValueError(f"no rule fills the forward's {name} ({value.dtype})")
    return kwargs


@contextlib.contextmanager
def simulated_rank(transformer, family: str, ranks: int):
    """Rank 0's share of Ulysses `ranks` on this one device (see the module docstring). One rank
    is a group of one through the same processors, so its attention kernel is the shares'."""
    stand_in = object()  # a non-None "group": the engine's code takes its parallel branches

    def all_to_all(x, *, group, stats):
        return x.contiguous()

    def all_gather(x, *, dim, group, stats):
        return torch.cat([x] * ranks, dim=dim)

    saved = [(m, n, getattr(m, n)) for m in (attention_module, sequence_module) for n in ("all_to_all", "all_gather")
             if hasattr(m, n)]
    for module, name, _ in saved:
        setattr(module, name, {"all_to_all": all_to_all, "all_gather": all_gather}[name])
    groups = AttentionGroups(ulysses=stand_in, ulysses_size=ranks)
    shard = SequenceShard(attention=groups, group=stand_in, size=ranks, index=0)
    handle = apply_sequence_parallel(transformer, get_spec(family).token_plan, shard)
    try:
        yield
    finally:
        handle.remove()
        for module, name, original in saved:
            setattr(module, name, original)


class Timer:
    """Median seconds of `fn()` over `repeat` calls (compile_blocks.timed: CUDA events on the
    compute stream, else wall time)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, *, repeat: int) -> float:
        return timed(fn, self.device, repeat)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(fn: Callable[[], dict]) -> dict:
    """Run one measurement; an exception (out of memory, a missing package) becomes its result,
    and its memory is freed before the next row."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - every failure is a result to report
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"}
    finally:
        free_memory()


@dataclasses.dataclass
class Context:
    smoke: bool
    device: torch.device
    dtype: torch.dtype
    timer: Timer
    repeat: int
    cases: list[Case]
    out: Path
    stem: str


# ---- sections: each a generator of rows ------------------------------------------------------

def gpu_tests(ctx: Context, limit: float) -> Iterator[dict]:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if ctx.smoke:
        argv.append("--collect-only")
    log = ctx.out / f"{ctx.stem}-gpu-tests.log"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=max(1.0, limit - 5))
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        status = f"timed out after {limit - 5:.0f} s"
    log.write_text(output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    yield {"command": " ".join(argv[1:]), "exit": status, "summary": lines[-1] if lines else "",
           "failed": "; ".join(failed), "log": log.name, "seconds": time.perf_counter() - t0}


PARITY_FAMILIES = tuple(family for family, spec in SPECS.items() if not spec.needs_image)
"""The text-to-video families of the registry (tests/families.py runs them through diffusers' pipelines)."""


def parity(ctx: Context, limit: float) -> Iterator[dict]:
    """Engine against diffusers in bfloat16 on the device, one tiny family a row (--smoke: Wan in
    float32 on the CPU, where the two are equal to float32 rounding)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import families  # noqa: E402 - the tests' one harness for diffusers' pipelines
    from unison.engine.config import ModelConfig, OutputConfig, RunConfig
    from unison.engine.render import Engine
    from unison.launch.cli import main as cli

    dtype = "float32" if ctx.smoke else "bfloat16"
    for family in PARITY_FAMILIES[:1] if ctx.smoke else PARITY_FAMILIES:
        def measure(family=family) -> dict:
            folder = ctx.out / f"tiny-{family}-{dtype}"
            if not folder.is_dir() and cli(["make-tiny", "--family", family, "--out", str(folder),
                                             "--dtype", dtype]) != 0:
                raise RuntimeError(f"make-tiny --family {family} failed")
            s = families.sampling(family, steps=3, folder=ctx.out)
            config = RunConfig(model=ModelConfig(path=str(folder), dtype=dtype, device=str(ctx.device)),
                               sampling=s, output=OutputConfig(decode=False, progress=False))
            ours = Engine.from_config(config).render().latents
            pipe = families.pipeline(family, str(folder), dtype=getattr(torch, dtype)).to(ctx.device)
            theirs = families.run(pipe, family, s)
            err = ((ours.float() - theirs.float().to(ours.device)).norm() / theirs.float().norm()).item()
            return {"dtype": dtype, "rel_err": err, "equal": bool(torch.equal(ours, theirs.to(ours.device)))}
        yield {"family": family, **_row(measure)}


def _shape(case: Case, transformer) -> TransformerShape:
    """What parallel/cost.py counts a rank's bytes from, as the planner gives it (engine/planner/layouts.py)."""
    spec, c = get_spec(case.family), dict(transformer.config)
    pt, ph, pw = patch_size(c)
    _, _, f, h, w = case.latents
    return TransformerShape(video_tokens=(f // pt) * (h // ph) * (w // pw), heads=c["num_attention_heads"],
                            head_dim=c["attention_head_dim"], attentions=spec.block_count(c),
                            latent_elements=(c.get("out_channels") or c["in_channels"]) * f * h * w,
                            joint_text_tokens=spec.meta.joint_text(case.text_tokens) if spec.joint_text else 0)


def forwards(ctx: Context, limit: float) -> Iterator[dict]:
    for case in ctx.cases:
        held: dict = {}

        def build(case=case) -> dict:
            held["transformer"] = transformer = build_transformer(case, ctx.device, ctx.dtype)
            held["kwargs"] = kwargs = inputs(case, transformer, ctx.device, ctx.dtype)
            held["shape"] = _shape(case, transformer)
            with torch.no_grad(), simulated_rank(transformer, case.family, max(case.ranks)):
                transformer(**kwargs)  # warm-up (kernels, allocator) at the smallest share
            return {}

        failed = _row(build)
        if failed:  # out of memory while building or warming up: that case's rows say so
            held.clear()
            free_memory()
            yield {"case": case.name, "ranks": ",".join(map(str, case.ranks)), **failed}
            continue
        for n in case.ranks:
            def measure(n=n) -> dict:
                transformer, kwargs = held["transformer"], held["kwargs"]
                reset_peak(ctx.device)
                with torch.no_grad(), simulated_rank(transformer, case.family, n):
                    seconds = ctx.timer(lambda: transformer(**kwargs), repeat=ctx.repeat)
                sent = sum(bytes_per_step(held["shape"], ulysses=n,
                                          element_bytes=torch.finfo(ctx.dtype).bits // 8).values())
                return {"seconds": seconds, "peak_gib": peak_gib(ctx.device), "bytes": sent,
                        "comm_projection_s": sent / (NVLINK_GBPS * 1e9)}
            yield {"case": case.name, "ranks": n, "tokens": held["shape"].video_tokens, **_row(measure)}
        held.clear()
        free_memory()


def compiled(ctx: Context, limit: float) -> Iterator[dict]:
    from unison.engine.compile import compile_blocks

    case = ctx.cases[0]

    def measure(compile_it: bool) -> dict:
        transformer = build_transformer(case, ctx.device, ctx.dtype)
        kwargs = inputs(case, transformer, ctx.device, ctx.dtype)
        with torch.no_grad():
            t0 = time.perf_counter()
            if compile_it:
                compile_blocks(transformer, get_spec(case.family))
            transformer(**kwargs)  # eager: warm-up; compiled: compilation happens here
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            first = time.perf_counter() - t0
            seconds = ctx.timer(lambda: transformer(**kwargs), repeat=ctx.repeat)
        return {"first_call_s": first, "seconds": seconds}

    for mode in ("eager", "compiled"):
        yield {"case": case.name, "mode": mode, **_row(lambda m=mode: measure(m == "compiled"))}


def caches(ctx: Context, limit: float) -> Iterator[dict]:
    case = ctx.cases[0]
    spec = get_spec(case.family)
    never = {"none": CacheConfig(),
             "fbcache": CacheConfig(kind="fbcache", threshold=0.0),
             "pab": CacheConfig(kind="pab", self_skip_range=None, cross_skip_range=None)}
    held: dict = {}
    failed = _row(lambda: held.update(transformer=(t := build_transformer(case, ctx.device, ctx.dtype)),
                                      kwargs=inputs(case, t, ctx.device, ctx.dtype)) or {})
    if failed:
        held.clear()
        yield {"case": case.name, "cache": "all", **failed}
        return
    base = None
    for kind, config in never.items():
        def measure(config=config) -> dict:
            transformer, kwargs = held["transformer"], held["kwargs"]
            applied = apply_caches(SimpleNamespace(transformer=transformer), spec, config)
            steps = iter(range(10**6))

            def forward():
                # A new timestep every call, as in denoising: the first block's residual changes,
                # so a threshold of 0 never skips.
                step = next(steps)
                for cache in applied.values():
                    cache.begin_step(step, 999.0 - step)
                    cache.set_context("cond")
                transformer(**{**kwargs, "timestep": kwargs["timestep"] * 0 + (999.0 - step)})

            try:
                with torch.no_grad():
                    forward()
                    seconds = ctx.timer(forward, repeat=ctx.repeat)
                skipped = sum(c["skipped"] for cache in applied.values() for c in cache.summary().values())
            finally:
                for cache in applied.values():
                    cache.remove()
            return {"seconds": seconds, "skipped": skipped}
        row = {"case": case.name, "cache": kind, **_row(measure)}
        if kind == "none":
            base = row.get("seconds")
        if base and "seconds" in row:
            row["overhead"] = row["seconds"] / base
        yield row
    held.clear()


def vae(ctx: Context, limit: float) -> Iterator[dict]:
    from diffusers import AutoencoderKLWan

    held: dict = {}

    def build() -> dict:
        if ctx.smoke:
            held["vae"] = get_spec("wan").build_tiny(0).vae
        else:
            with torch.device(ctx.device):
                held["vae"] = AutoencoderKLWan()  # the Wan 2.1 VAE's configuration
        held["vae"] = held["vae"].to(device=ctx.device, dtype=torch.float32).eval()
        return {}

    if ctx.smoke:
        sizes = [("tiny 64x64x9", (1, 16, 3, 8, 8), False)]
    else:
        sizes = [("480x832x81", (1, 16, 21, 60, 104), False), ("480x832x81", (1, 16, 21, 60, 104), True),
                 ("720x1280x81", (1, 16, 21, 90, 160), True)]
    failed = _row(build)
    if failed:
        yield {"video": "all", **failed}
        return
    model = held["vae"]
    for name, shape, tiled in sizes:
        def measure(shape=shape, tiled=tiled) -> dict:
            model.enable_tiling() if tiled else model.disable_tiling()
            z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(ctx.device)
            reset_peak(ctx.device)
            with torch.no_grad():
                seconds = ctx.timer(lambda: model.decode(z, return_dict=False), repeat=1)
            return {"seconds": seconds, "peak_gib": peak_gib(ctx.device)}
        yield {"video": name, "tiled": tiled, **_row(measure)}
    held.clear()


def _random_lora(path: Path, transformer, *, seed: int, rank: int) -> Path:
    """A rank-`rank` LoRA in diffusers keys on every linear layer of the blocks' attention and MLP
    (random, bfloat16 as published LoRAs are), written to `path`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and (".attn" in name or ".ffn" in name):
            state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=g) * 0.01
                                                          ).to(torch.bfloat16)
            state[f"transformer.{name}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=g) * 0.01
                                                          ).to(torch.bfloat16)
    save_file(state, str(path))
    return path


def loras(ctx: Context, limit: float) -> Iterator[dict]:
    """A LoRA switch against the copy to the device that a reload of the same weights makes: the
    first Wan case (14B at real size; the tiny one with --smoke), a rank-64 LoRA (rank 2 tiny) on
    every attention and MLP layer of its blocks."""
    from unison.engine.config import LoraConfig
    from unison.engine.lora import Loras

    case = next(c for c in ctx.cases if c.family == "wan" and (ctx.smoke or c.config.get("num_layers") == 40))
    spec = get_spec(case.family)
    held: dict = {}
    folder = Path(tempfile.mkdtemp(prefix="gpu-suite-lora-"))

    def build() -> dict:
        held["transformer"] = transformer = build_transformer(case, ctx.device, ctx.dtype)
        rank = 2 if ctx.smoke else 64
        held["files"] = [_random_lora(folder / f"{i}.safetensors", transformer, seed=i, rank=rank) for i in (1, 2)]
        held["loras"] = Loras(SimpleNamespace(transformer=transformer), spec)
        return {}

    failed = _row(build)
    if failed:
        yield {"case": case.name, "what": "all", **failed}
        return
    a, b = (LoraConfig(path=str(f)) for f in held["files"])

    def switch(to) -> dict:
        seconds = first_call(lambda: held["loras"].use(to), ctx.device)  # wall time (files, peft, copies)
        return {"seconds": seconds, "host_copies": len(held["loras"].originals)}  # weights changed so far

    for what, to in [("first fuse (file A read)", (a,)), ("switch A -> B (file B read)", (b,)),
                     ("switch B -> A (both read before)", (a,)), ("back to no LoRA", ())]:
        yield {"case": case.name, "what": what, **_row(lambda to=to: switch(to))}

    def reload_copy() -> dict:
        transformer = held["transformer"]
        transformer.to("cpu")
        seconds = first_call(lambda: transformer.to(ctx.device), ctx.device)
        gib = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
        return {"seconds": seconds, "gib": round(gib, 2)}

    yield {"case": case.name, "what": "weights host -> device (a reload's copy, no disk)", **_row(reload_copy)}
    held.clear()
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()


@dataclasses.dataclass(frozen=True)
class Section:
    key: str
    title: str
    run: Callable[[Context, float], Iterator[dict]]
    estimate_s: float
    """What a real run needs at least (a projection from the rehearsal's counts, not a
    measurement); the section is skipped when less time is left."""
    cap_s: float
    """The most it may take on a GPU."""


SECTIONS = [
    Section("tests", "gpu-marked tests", gpu_tests, 45, 150),
    Section("parity", "bf16 parity of the tiny families with diffusers", parity, 20, 90),
    Section("forward", FORWARD_TITLE, forwards, 90, 240),
    Section("compile", "eager vs compiled (model.compile=blocks)", compiled, 60, 150),
    Section("caches", "cache overhead, never skipping", caches, 30, 90),
    Section("lora", "LoRA switch vs a reload's copy to the device", loras, 40, 120),
    Section("vae", "VAE decode, float32", vae, 30, 120),
]
SMOKE_ESTIMATE_S = 1.0
"""--smoke: every section's estimate (tiny shapes)."""


# ---- the result file ------------------------------------------------------------------------

class SectionTimeout(BaseException):
    """A section ran past its limit (a BaseException: a row's failure handler must not eat it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SectionTimeout in the main thread after `seconds` (no limit off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "/")

    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]


class ResultFile:
    """The markdown and JSON-lines results, on disk after every row."""

    def __init__(self, out: Path, stem: str, header: list[str]):
        out.mkdir(parents=True, exist_ok=True)
        self.md, self.jsonl = out / f"{stem}.md", out / f"{stem}.jsonl"
        self.header = header
        self.sections: dict[str, list[dict]] = {}
        self.notes: dict[str, str] = {}
        self.jsonl.write_text("")
        self.flush()

    def open_section(self, title: str, note: str = "") -> None:
        self.sections.setdefault(title, [])
        if note:
            self.notes[title] = note
        self.flush()

    def add(self, title: str, row: dict) -> None:
        self.sections.setdefault(title, []).append(row)
        # The markdown first: a row in the JSON lines is then in the markdown too, whenever the
        # suite is killed (a kill between the two leaves the markdown one row ahead).
        self.flush()
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"section": title, **row}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[{title}] {row}", flush=True)

    def flush(self) -> None:
        """Rewrite the markdown whole and rename it into place."""
        lines = list(self.header)
        for title, rows in self.sections.items():
            lines += [f"## {title}", ""]
            if title in self.notes:
                lines += [self.notes[title], ""]
            lines += [*_table(rows), ""]
        partial = self.md.with_name(self.md.name + ".part")
        with open(partial, "w") as f:
            f.write("\n".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.md)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_suite(*, smoke: bool, out: str | Path | None = None, skip_tests: bool = False, budget: float = 540.0,
              sections: list[str] | None = None) -> tuple[Path, dict[str, list[dict]]]:
    """The chosen sections within `budget` seconds; returns the result file and the rows by
    section title."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-weight models are cast with .to() on purpose
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        raise SystemExit("gpu_suite.py: no CUDA GPU here; use --smoke for the CPU run")
    chosen = [s for s in SECTIONS if (sections is None or s.key in sections) and not (skip_tests and s.key == "tests")]
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gpu-suite-smoke-"))
    dtype = torch.float32 if smoke else torch.bfloat16
    slug = "smoke-cpu" if smoke else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    today = datetime.date.today().isoformat()
    stem = f"{today}-gpu-suite-{slug}"
    ctx = Context(smoke=smoke, device=device, dtype=dtype, timer=Timer(device), repeat=1 if smoke else 2,
                  cases=smoke_cases() if smoke else real_cases(), out=out, stem=stem)
    results = ResultFile(out, stem, [
        f"# GPU suite, {today}", "",
        f"Device: {device_name(device)}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"dtype {str(dtype).removeprefix('torch.')}; "
        f"{'--smoke (tiny shapes)' if smoke else 'real sizes, random weights'}; budget {budget:.0f} s.", "",
        "Per-rank rows are one rank's compute measured on this one device (communication left out); "
        f"`comm_projection_s` is a projection: the rank's bytes per forward at {NVLINK_GBPS:.0f} GB/s.", ""])
    started = time.perf_counter()
    for section in chosen:
        left = budget - (time.perf_counter() - started)
        estimate = SMOKE_ESTIMATE_S if smoke else section.estimate_s
        if left < estimate:
            results.open_section(section.title, f"Skipped: needs about {estimate:.0f} s, {max(left, 0):.0f} s "
                                                f"of the budget left.")
            continue
        limit = left if smoke else min(section.cap_s, left)
        results.open_section(section.title)
        t0 = time.perf_counter()
        rows = section.run(ctx, limit)
        try:
            with time_limit(limit):
                for row in rows:
                    results.add(section.title, row)
        except SectionTimeout:
            rows.close()
            free_memory()
            results.add(section.title, {"error": f"section stopped at its limit of {limit:.0f} s"})
        except Exception as err:  # noqa: BLE001 - a section that fails outside its rows is a row too
            traceback.print_exc()
            free_memory()
            results.add(section.title, {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"})
        results.notes[section.title] = f"{time.perf_counter() - t0:.1f} s."
    total = time.perf_counter() - started
    results.header[2] += f" Total {total:.0f} s."
    results.flush()
    print(f"wrote {results.md} and {results.jsonl.name} ({total:.0f} s)")
    return results.md, results.sections


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (what the test suite runs)")
    p.add_argument("--out", default=None,
                   help="folder of the result files (default: benchmarks/results/ on a GPU, a new temporary "
                        "folder with --smoke)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite (default 540)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated keys to run, in the suite's order ({','.join(s.key for s in SECTIONS)})")
    p.add_argument("--skip-tests", action="store_true", help="leave out the gpu-marked tests")
    args = p.parse_args(argv)
    keys = None
    if args.sections:
        keys = [k.strip() for k in args.sections.split(",") if k.strip()]
        unknown = sorted(set(keys) - {s.key for s in SECTIONS})
        if unknown:
            p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(s.key for s in SECTIONS)}")
    if args.budget <= 0:
        p.error("--budget must be positive")
    out = args.out if args.out or args.smoke else str(Path(__file__).resolve().parent / "results")
    run_suite(smoke=args.smoke, out=out, skip_tests=args.skip_tests, budget=args.budget, sections=keys)


if __name__ == "__main__":
    main()
