"""The GPU suite: one command that shows what unison does on a real GPU, in under 10 minutes on
one H100, and writes a dated result file naming the GPU.

    python benchmarks/gpu_suite.py                 # on a GPU: real sizes, bf16
    python benchmarks/gpu_suite.py --smoke --out D # the same code at tiny sizes on the CPU (a test runs it)

Sections (each one's failure, e.g. out of memory, is recorded as its row's result, not fatal):
1. The `gpu`-marked tests (`pytest -m gpu`; with --smoke only collected).
2. One transformer forward at real size with random weights in bf16: Wan 2.1 1.3B at
   480x832x81; the per-rank share of Wan 14B at 720x1280x81 and HunyuanVideo at 720x1280x129 for
   1, 2, 4 and 8 ranks. A rank's share is simulated on the one GPU by running the engine's own
   Ulysses attention with its collectives replaced by shape-preserving stand-ins (the all-to-all
   returns the rank's own chunk, the all-gather repeats it): every matmul and attention has the
   exact shape one rank of N computes (its 1/N of the tokens in the projections and MLPs, all
   tokens at 1/N of the heads in attention); only the communication is left out, and it is
   printed beside as bytes (parallel/cost.py) and a projection at a stated link bandwidth.
3. Eager vs compiled (model.compile=blocks): compile time and step time, Wan 1.3B at 480p.
4. Each cache's overhead with settings that never skip (First-Block Cache threshold 0, PAB
   without skip ranges), Wan 1.3B at 480p, against no cache.
5. VAE decode (Wan 2.1 VAE, random weights): time and peak memory at 480p and 720p, 81 frames.
Times are CUDA-event times of the compute stream (median of the timed runs, after a warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from compile_blocks import timed  # noqa: E402 - benchmarks/ is on the path (script or test)
from unison.engine.caches import apply_caches
from unison.engine.config import CacheConfig
from unison.engine.models import get_spec
from unison.parallel import attention as attention_module
from unison.parallel import sequence as sequence_module
from unison.parallel.attention import AttentionGroups
from unison.parallel.cost import TransformerShape, bytes_per_step
from unison.parallel.sequence import Handle, SequenceShard

NVLINK_GBPS = 450.0
"""Per-direction NVLink 4 bandwidth of an H100 SXM (GB/s) for the communication projection."""

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str
    config: dict
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
        Case("HunyuanVideo 720x1280x129", "hunyuanvideo", {}, (1, 16, 33, 90, 160), 256, (1, 2, 4, 8)),
    ]


def smoke_cases() -> list[Case]:
    return [
        Case("tiny Wan", "wan", None, (1, 16, 3, 8, 8), 16, (1, 2, 4)),
        Case("tiny HunyuanVideo", "hunyuanvideo", None, (1, 16, 3, 8, 8), 32, (1, 2)),
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


def inputs(case: Case, transformer, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c = transformer.config
    b, _, f, h, w = case.latents
    kwargs = dict(hidden_states=randn(b, c.in_channels, f, h, w), timestep=torch.tensor([500.0], device=device),
                  return_dict=False)
    if case.family == "hunyuanvideo":
        kwargs.update(encoder_hidden_states=randn(1, case.text_tokens, c.text_embed_dim),
                      encoder_attention_mask=torch.ones(1, case.text_tokens, device=device, dtype=torch.bool),
                      pooled_projections=randn(1, c.pooled_projection_dim),
                      guidance=torch.tensor([6000.0], device=device, dtype=dtype))
    else:
        kwargs.update(encoder_hidden_states=randn(1, case.text_tokens, c.text_dim))
    return kwargs


@contextlib.contextmanager
def simulated_rank(transformer, family: str, ranks: int):
    """Rank 0's share of Ulysses `ranks` on this one device (see the module docstring)."""
    if ranks == 1:
        yield
        return
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
    handle = Handle()
    get_spec(family).sequence_parallel_plan(transformer, shard, handle)
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


def _row(fn) -> dict:
    """Run one measurement; an exception (out of memory, a missing package) becomes its result."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - every failure is a result to report
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shape(case: Case, transformer) -> TransformerShape:
    c = transformer.config
    patch = c.patch_size if isinstance(c.patch_size, (list, tuple)) else (c.patch_size_t, c.patch_size, c.patch_size)
    _, _, f, h, w = case.latents
    tokens = (f // patch[0]) * (h // patch[1]) * (w // patch[2])
    hunyuan = case.family == "hunyuanvideo"
    attentions = c.num_layers + c.num_single_layers if hunyuan else c.num_layers
    return TransformerShape(video_tokens=tokens, heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                            attentions=attentions, latent_elements=int(torch.Size(case.latents).numel()),
                            joint_text_tokens=case.text_tokens if hunyuan else 0)


def forward_rows(cases: list[Case], device, dtype, timer: Timer, repeat: int) -> list[dict]:
    rows = []
    for case in cases:
        transformer = build_transformer(case, device, dtype)
        kwargs = inputs(case, transformer, device, dtype)
        shape = _shape(case, transformer)
        with torch.no_grad():
            with simulated_rank(transformer, case.family, max(case.ranks)):
                transformer(**kwargs)  # warm-up (kernels, allocator) at the smallest share
            for n in case.ranks:
                def measure(n=n):
                    reset_peak(device)
                    with torch.no_grad(), simulated_rank(transformer, case.family, n):
                        seconds = timer(lambda: transformer(**kwargs), repeat=repeat)
                    sent = sum(bytes_per_step(shape, ulysses=n, element_bytes=torch.finfo(dtype).bits // 8).values())
                    return {"seconds": seconds, "peak_gib": peak_gib(device), "bytes": sent,
                            "comm_projection_s": sent / (NVLINK_GBPS * 1e9)}
                rows.append({"case": case.name, "ranks": n, "tokens": shape.video_tokens, **_row(measure)})
                print(rows[-1], flush=True)
        del transformer, kwargs
    return rows


def compile_rows(case: Case, device, dtype, timer: Timer, repeat: int) -> list[dict]:
    from unison.engine.compile import compile_blocks

    def measure(compiled: bool) -> dict:
        transformer = build_transformer(case, device, dtype)
        kwargs = inputs(case, transformer, device, dtype)
        with torch.no_grad():
            t0 = time.perf_counter()
            if compiled:
                compile_blocks(transformer, get_spec(case.family))
            transformer(**kwargs)  # eager: warm-up; compiled: compilation happens here
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            seconds = timer(lambda: transformer(**kwargs), repeat=repeat)
        return {"first_call_s": first, "seconds": seconds}

    return [{"case": case.name, "mode": mode, **_row(lambda m=mode: measure(m == "compiled"))}
            for mode in ("eager", "compiled")]


def cache_rows(case: Case, device, dtype, timer: Timer, repeat: int) -> list[dict]:
    spec = get_spec(case.family)
    never = {"none": CacheConfig(),
             "fbcache": CacheConfig(kind="fbcache", threshold=0.0),
             "pab": CacheConfig(kind="pab", self_skip_range=None, cross_skip_range=None)}
    transformer = build_transformer(case, device, dtype)
    kwargs = inputs(case, transformer, device, dtype)
    rows = []
    for kind, config in never.items():
        def measure(config=config):
            caches = apply_caches(SimpleNamespace(transformer=transformer), spec, config)
            steps = iter(range(10**6))

            def forward():
                # A new timestep every call, as in denoising: the first block's residual changes,
                # so a threshold of 0 never skips.
                step = next(steps)
                for cache in caches.values():
                    cache.begin_step(step, 999.0 - step)
                    cache.set_context("cond")
                transformer(**{**kwargs, "timestep": kwargs["timestep"] * 0 + (999.0 - step)})

            try:
                with torch.no_grad():
                    forward()
                    seconds = timer(forward, repeat=repeat)
                skipped = sum(c["skipped"] for cache in caches.values() for c in cache.summary().values())
            finally:
                for cache in caches.values():
                    cache.remove()
            return {"seconds": seconds, "skipped": skipped}
        rows.append({"case": case.name, "cache": kind, **_row(measure)})
    base = rows[0].get("seconds")
    for row in rows:
        if base and "seconds" in row:
            row["overhead"] = row["seconds"] / base
    return rows


def vae_rows(smoke: bool, device, timer: Timer) -> list[dict]:
    from diffusers import AutoencoderKLWan

    if smoke:
        vae = get_spec("wan").build_tiny(0).vae
        sizes = [("tiny 64x64x9", (1, 16, 3, 8, 8), False)]
    else:
        with torch.device(device):
            vae = AutoencoderKLWan()  # the Wan 2.1 VAE's configuration
        sizes = [("480x832x81", (1, 16, 21, 60, 104), False), ("480x832x81", (1, 16, 21, 60, 104), True),
                 ("720x1280x81", (1, 16, 21, 90, 160), True)]
    vae = vae.to(device=device, dtype=torch.float32).eval()
    rows = []
    for name, shape, tiled in sizes:
        def measure(shape=shape, tiled=tiled):
            vae.enable_tiling() if tiled else vae.disable_tiling()
            z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
            reset_peak(device)
            with torch.no_grad():
                seconds = timer(lambda: vae.decode(z, return_dict=False), repeat=1)
            return {"seconds": seconds, "peak_gib": peak_gib(device)}
        rows.append({"video": name, "tiled": tiled, **_row(measure)})
        print(rows[-1], flush=True)
    return rows


def gpu_tests(smoke: bool) -> dict:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if smoke:
        argv.append("--collect-only")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return {"command": " ".join(argv[1:]), "exit": proc.returncode, "summary": lines[-1] if lines else "",
            "seconds": time.perf_counter() - t0}


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_suite(*, smoke: bool, out: str | Path, skip_tests: bool = False) -> tuple[Path, dict[str, list[dict]]]:
    """Every section; returns the result file and the rows by section."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-weight models are cast with .to() on purpose
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        raise SystemExit("gpu_suite.py: no CUDA GPU here; use --smoke for the CPU run")
    dtype = torch.float32 if smoke else torch.bfloat16
    timer, repeat = Timer(device), (1 if smoke else 2)
    cases = smoke_cases() if smoke else real_cases()
    started = time.perf_counter()
    sections = {}
    sections["gpu-marked tests"] = [] if skip_tests else [gpu_tests(smoke)]
    sections["one forward, per-rank share of Ulysses N (compute only)"] = forward_rows(
        cases, device, dtype, timer, repeat)
    sections["eager vs compiled (model.compile=blocks)"] = compile_rows(cases[0], device, dtype, timer, repeat)
    sections["cache overhead, never skipping"] = cache_rows(cases[0], device, dtype, timer, repeat)
    sections["VAE decode, float32"] = vae_rows(smoke, device, timer)
    total = time.perf_counter() - started
    slug = "smoke-cpu" if smoke else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    today = datetime.date.today().isoformat()
    path = Path(out) / f"{today}-gpu-suite-{slug}.md"
    lines = [f"# GPU suite, {today}", "",
             f"Device: {device_name(device)}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}; "
             f"{'--smoke (tiny shapes)' if smoke else 'real sizes, random weights'}; total {total:.0f} s.", "",
             "Per-rank rows are one rank's compute measured on this one device (communication left out); "
             f"`comm_projection_s` is a projection: the rank's bytes per forward at {NVLINK_GBPS:.0f} GB/s.", ""]
    for title, rows in sections.items():
        lines += [f"## {title}", "", *_table(rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path} ({total:.0f} s)")
    return path, sections


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (what the test suite runs)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder of the result file")
    p.add_argument("--skip-tests", action="store_true", help="leave out the gpu-marked tests")
    args = p.parse_args(argv)
    run_suite(smoke=args.smoke, out=args.out, skip_tests=args.skip_tests)


if __name__ == "__main__":
    main()
