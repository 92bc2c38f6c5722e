"""How far `unison plan`'s VAE figures (engine/planner/model.py: the peak of live tensors of one
encode or decode, traced on the meta device) are from what a real encode or decode takes on
this machine's CPU, for small random-weight Wan 2.1 VAEs at a few sizes.

Each measurement runs in a fresh process, one torch thread, glibc's mmap threshold at 64 KiB (so
freed buffers leave the resident set at once), after a one-frame warm-up: the growth of the peak
resident set (/proc/self/clear_refs "5", then VmHWM after minus VmRSS before) during one whole,
untiled `encode` of pixels or `decode` of latents, float32. The trace is meta_model.peak_bytes on
the same call. The ratio measured / traced says what the trace leaves out (convolution
workspaces, allocator rounding).

    python benchmarks/vae_trace_vs_cpu.py [--write benchmarks/results/DATE-vae-trace-vs-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from unison.engine.planner import meta as meta_model

MEASURE = """
import ctypes, json, sys
import torch
from diffusers import AutoencoderKLWan

def status(name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))

config, shape, method = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
torch.manual_seed(0)
vae = AutoencoderKLWan(**config).eval()
x = torch.randn(*shape)
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024)
with torch.no_grad():
    getattr(vae, method)(x[:, :, :1])
    libc.malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    getattr(vae, method)(x)
print(status("VmHWM") - before)
"""

VAES = {"base_dim 8": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True]),
        "base_dim 16": dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            temperal_downsample=[False, True, True])}
SIZES = [(17, 256, 256), (33, 256, 256), (17, 256, 448)]
"""(pixel frames, height, width); the latents are (1 + (frames - 1) / 4, height / 8, width / 8)."""


def traced(config: dict, shape: tuple[int, ...], method: str) -> int:
    with meta_model.quiet_diffusers():
        vae = meta_model.build("diffusers", "AutoencoderKLWan", config)
    x = torch.empty(shape, device=meta_model.META)
    return meta_model.peak_bytes(lambda: getattr(vae, method)(x, return_dict=False))


def measured(config: dict, shape: tuple[int, ...], method: str) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config), json.dumps(list(shape)), method],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return int(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, help="write the markdown table here")
    args = p.parse_args()
    rows = ["| VAE | call | input | traced MiB | measured MiB | measured / traced |", "|---|---|---|---:|---:|---:|"]
    for name, config in VAES.items():
        for frames, height, width in SIZES:
            for method, shape in (("encode", (1, 3, frames, height, width)),
                                  ("decode", (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8))):
                t, m = traced(config, shape, method), measured(config, shape, method)
                rows.append(f"| {name} | {method} | {tuple(shape)} | {t / 2**20:.1f} | {m / 2**20:.1f} | {m / t:.2f} |")
                print(rows[-1], flush=True)
    text = "\n".join([
        f"# `unison plan`'s VAE trace against a CPU encode and decode ({datetime.date.today()})", "",
        f"Device: CPU only ({platform.machine()}, 2 cores), torch {torch.__version__}, one torch thread; not a GPU. "
        "Produced by `python benchmarks/vae_trace_vs_cpu.py` (see its docstring for the method).", "",
        *rows, ""])
    if args.write:
        args.write.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
