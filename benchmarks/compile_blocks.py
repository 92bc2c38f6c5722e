"""Eager vs compiled (model.compile=blocks): compile time and step time, on one device.

    python benchmarks/compile_blocks.py                                   # CPU, tiny presets
    python benchmarks/compile_blocks.py --device cuda --size real         # GPU, real sizes, bf16

For each family, one transformer with random weights is timed eager and then compiled
(engine/compile.py's compile_blocks on the same module, so both run the same weights):
- first call: the first forward (compiled: TorchDynamo, AOT and inductor compile the block
  graphs here; eager: allocator and kernel warm-up), wall time;
- second transformer: a fresh model of the same class, compiled and called once: what a second
  engine in the same process pays (the compiled block classes are shared per process);
- forward: median time of a transformer forward after warm-up (CUDA events on a GPU), eager and
  compiled measured in interleaved rounds on the same weights. A denoising step is two forwards
  with classifier-free guidance (one per branch), plus the scheduler's update, which
  compilation does not touch;
- graphs: graphs TorchDynamo compiled for the blocks, and compiled frames.
The inductor cache starts empty (a fresh TORCHINDUCTOR_CACHE_DIR), so the compile times are cold;
`--warm-cache` keeps the user's cache.

Sizes: tiny = the families' tiny presets (Wan 3 blocks of 4 heads x 12; HunyuanVideo 2 + 2
blocks of 4 heads x 10) at 64x64x17 (80 video tokens); real = Wan 2.1 1.3B at 480x832x81 (32760
tokens), HunyuanVideo (13B) at 544x960x65 (34680 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unison.engine.models import get_spec

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
SIZES = {
    # family: {size: (transformer config or None for the tiny preset's, latents (B, C, F, H, W), text tokens)}
    "wan": {"tiny": (None, (1, 16, 5, 8, 8), 16), "real": (WAN_1_3B, (1, 16, 21, 60, 104), 512)},
    "hunyuanvideo": {"tiny": (None, (1, 4, 5, 8, 8), 32), "real": ({}, (1, 16, 17, 68, 120), 256)},
}


def build(family: str, size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = SIZES[family][size][0]
    if config is None:
        transformer = get_spec(family).build_tiny(0).transformer
    else:
        import diffusers

        with torch.device(device):
            transformer = getattr(diffusers, get_spec(family).transformer_class)(**config)
    return transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)


def inputs(family: str, size: str, transformer, device: torch.device, dtype: torch.dtype) -> dict:
    _, latents, text = SIZES[family][size]
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c = transformer.config
    b, _, f, h, w = latents
    kwargs = dict(hidden_states=randn(b, c.in_channels, f, h, w), timestep=torch.tensor([500.0], device=device),
                  return_dict=False)
    if family == "hunyuanvideo":
        mask = torch.ones(1, text, device=device, dtype=dtype)
        mask[:, text * 3 // 4:] = 0  # padded prompt, as the pipeline passes it
        kwargs.update(encoder_hidden_states=randn(1, text, c.text_embed_dim), encoder_attention_mask=mask,
                      pooled_projections=randn(1, c.pooled_projection_dim),
                      guidance=torch.tensor([6000.0], device=device, dtype=dtype))
    else:
        kwargs.update(encoder_hidden_states=randn(1, text, c.text_dim))
    return kwargs


def tokens(family: str, size: str, transformer) -> int:
    c = transformer.config
    patch = c.patch_size if isinstance(c.patch_size, (list, tuple)) else (c.patch_size_t, c.patch_size, c.patch_size)
    _, _, f, h, w = SIZES[family][size][1]
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn(): CUDA events on the compute stream, else wall time."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_call(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(family: str, size: str, device: torch.device, dtype: torch.dtype, repeat: int, rounds: int) -> list[dict]:
    from torch._dynamo.utils import counters

    from unison.engine.compile import compile_blocks

    spec = get_spec(family)
    transformer = build(family, size, device, dtype)
    kwargs = inputs(family, size, transformer, device, dtype)
    run = lambda: transformer(**kwargs)  # noqa: E731
    common = {"family": family, "tokens": tokens(family, size, transformer),
              "blocks": sum(len(getattr(transformer, attr)) for attr in spec.block_lists)}
    with torch.no_grad():
        eager_first = first_call(run, device)
        expected = run()[0]
        graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
        compiled = compile_blocks(transformer, spec)
        compiled_first = first_call(run, device)
        error = ((run()[0].float() - expected.float()).norm() / expected.float().norm()).item()
        graphs, frames = counters["stats"]["unique_graphs"] - graphs, counters["frames"]["total"] - frames
        # Interleaved rounds on the same weights (removing and re-applying the compilation swaps
        # classes back and forth; the graphs are kept), so a busy machine slows both alike.
        times = {"eager": [], "compiled": []}
        for _ in range(rounds):
            compiled.remove()
            times["eager"].append(timed(run, device, repeat))
            compiled = compile_blocks(transformer, spec)
            times["compiled"].append(timed(run, device, repeat))
        eager, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])

        del transformer, run, expected, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
        second = build(family, size, device, dtype)
        compile_blocks(second, spec)
        second_first = first_call(lambda: second(**kwargs), device)
    return [{**common, "mode": "eager", "first_call_s": eager_first, "forward_s": eager},
            {**common, "mode": "compiled", "first_call_s": compiled_first, "forward_s": compiled_s,
             "second_model_first_call_s": second_first, "graphs": graphs, "frames": frames,
             "speedup": eager / compiled_s, "rel_err_vs_eager": error}]


def table(rows: list[dict]) -> list[str]:
    columns = ["family", "tokens", "blocks", "mode", "first_call_s", "forward_s", "speedup",
               "second_model_first_call_s", "graphs", "frames", "rel_err_vs_eager"]

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=("tiny", "real"), default="tiny")
    p.add_argument("--family", action="append", choices=sorted(SIZES), help="repeatable (default: every family)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--repeat", type=int, default=10, help="timed forwards per round and mode")
    p.add_argument("--rounds", type=int, default=5, help="interleaved eager / compiled rounds")
    p.add_argument("--warm-cache", action="store_true", help="keep the inductor cache (default: a fresh one)")
    p.add_argument("--write", type=Path, help="result file (default: benchmarks/results/<date>-compile-<device>.md)")
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-weight models are cast with .to() on purpose
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    started = time.perf_counter()
    rows = []
    for family in args.family or sorted(SIZES):
        rows += measure(family, args.size, device, dtype, args.repeat, args.rounds)
        print(rows[-2], rows[-1], sep="\n", flush=True)
    text = "\n".join(table(rows))
    print(text)
    today = datetime.date.today().isoformat()
    kind = "cpu" if device.type == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower().replace("nvidia", "")).strip("-")
    out = args.write or Path(__file__).parent / "results" / f"{today}-compile-{kind}.md"
    header = (f"# Eager vs compiled transformer blocks ({today})\n\n"
              f"Device: {device_name(device)}; torch {torch.__version__}; {args.size} sizes, {dtype}, random "
              f"weights, one rank. Command: `python benchmarks/compile_blocks.py "
              f"--device {args.device} --size {args.size}`; total {time.perf_counter() - started:.0f} s. "
              f"Inductor cache {'as found' if args.warm_cache else 'empty at the start (cold compile)'}. "
              f"forward_s: median over {args.rounds} interleaved eager / compiled rounds of the median of "
              f"{args.repeat} forwards, after warm-up (a denoising step with CFG is two forwards); "
              "first_call_s: the first forward, compilation included; second_model_first_call_s: a second "
              "model of the same classes compiled in the same process; graphs / frames: what TorchDynamo "
              "compiled for the blocks.\n\n")
    out.write_text(header + text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
