"""Parallel VAE decode on the CPU: decode time and per-rank peak memory by degree (1, 2, 4),
against diffusers' own one-rank decode, tiled and untiled.

A random-weight Wan 2.1 VAE with few channels (base_dim 8, dim_mult 1-2-4-4; the real one has
base_dim 96) decodes 81 frames at 320x576 (latents 21 x 40x72) with the VAE's default tiles
(256 px, stride 192: a 2x3 grid). Few channels keep a decode to about two minutes on two cores;
they also make the per-tile activations small next to the decoded tiles, as long videos do.

Every run is a fresh set of gloo processes, one torch thread each, glibc's mmap threshold fixed
at 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the resident set at once. Memory:
each rank resets its peak resident set (/proc/self/clear_refs, "5") just before the decode and
reports VmHWM after it minus VmRSS before it: the growth of the process's resident memory caused
by the decode (model, latents and imports excluded). Time: the slowest rank's wall time of the
decode call, after a barrier.

    python benchmarks/vae_decode.py [--out benchmarks/results/DATE-vae-decode-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unison.parallel.comm import CommStats
from unison.parallel.vae import parallel_decode, plan_tiles

LATENTS = (1, 16, 21, 40, 72)
RUNS = [("diffusers, untiled", 1), ("diffusers, tiled", 1), ("unison", 1), ("unison", 2), ("unison", 4)]


def build_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rank(rank: int, world: int, port: int, out_dir: str, how: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    vae = build_vae()
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(1))
    stats = CommStats()
    with torch.no_grad():  # warm the kernels up on a one-tile latent
        vae.decode(latents[:, :, :1, :4, :4])
    if how == "diffusers, tiled":
        vae.enable_tiling()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _memory_kib("VmRSS")
    started = time.perf_counter()
    if how.startswith("diffusers"):
        with torch.no_grad():
            video = vae.decode(latents).sample
    else:
        video = parallel_decode(vae, latents, group=None if world == 1 else dist.group.WORLD, stats=stats)
    seconds = time.perf_counter() - started
    growth = (_memory_kib("VmHWM") - before) * 1024
    torch.save((video, seconds, growth, stats.bytes_sent["vae_gather"]), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run(how: str, world: int) -> list[tuple]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(world, port, out_dir, how), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each rank process starts
    shape = LATENTS
    plan = plan_tiles(build_vae(), shape)
    reference, rows = None, []
    for how, world in RUNS:
        results = run(how, world)
        video = results[0][0]
        if how == "diffusers, tiled":
            reference = video
        error = "" if reference is None else f"{(video - reference).abs().max().item():.1e}"
        growth = [r[2] for r in results]
        rows.append((how, world, max(r[1] for r in results), growth, sum(r[3] for r in results), error))
        print(f"{how:<20} {world} ranks  {rows[-1][2]:7.2f} s  peak growth per rank (MiB): "
              + ", ".join(f"{g / 2**20:.1f}" for g in growth) + f"  max |diff| vs tiled: {error or '-'}")
    t, h, w = video.shape[2:]
    lines = [f"# Parallel VAE decode (Wan VAE, CPU), {datetime.date.today()}", "",
             f"Device: CPU only ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, gloo, one "
             f"torch thread per rank process; not a GPU. Produced by `python benchmarks/vae_decode.py`.", "",
             f"Random-weight tiny-channel Wan 2.1 VAE (`build_vae` in the script); latents {tuple(shape)} -> "
             f"video {t} frames x {h}x{w}; the VAE's default tiles (256 px, stride 192): a {plan.grid[0]}x"
             f"{plan.grid[1]} grid, {len(plan.tiles)} tiles.", "",
             "| decode | ranks | time s (slowest rank) | peak memory growth per rank, MiB (rank 0, 1, ...) "
             "| max over ranks, MiB | bytes gathered, MiB | max abs diff vs diffusers tiled |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for how, world, seconds, growth, gathered, error in rows:
        lines.append(f"| {how} | {world} | {seconds:.2f} | " + ", ".join(f"{g / 2**20:.1f}" for g in growth)
                     + f" | {max(growth) / 2**20:.1f} | {gathered / 2**20:.1f} | {error or '-'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
