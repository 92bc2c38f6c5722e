"""GPUs and links the planner projects onto: published figures, and a calibration when one exists.

Peak throughput is the datasheet's dense bf16 tensor-core figure (without structured sparsity,
which halves the datasheet's headline number); memory is what torch reports for the card
(torch.cuda.get_device_properties(...).total_memory, in GiB), a little more than the datasheet's
decimal GB. Link bandwidths are per direction, per GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOPS."""
    memory_gib: float
    nvlink_gbps: float | None
    """NVLink bandwidth per direction, GB/s (None: the card has none)."""
    pcie_gbps: float
    """PCIe bandwidth per direction, GB/s (x16)."""
    source: str


GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM 80GB", 989.4, 79.6, 450.0, 64.0,
                "NVIDIA H100 datasheet: bf16 1,979 TFLOPS with sparsity; NVLink 4 900 GB/s both ways; PCIe 5"),
    "h200": Gpu("H200 SXM 141GB", 989.4, 140.4, 450.0, 64.0,
                "NVIDIA H200 datasheet: bf16 1,979 TFLOPS with sparsity; NVLink 4 900 GB/s both ways; PCIe 5"),
    "a100": Gpu("A100 SXM 80GB", 312.0, 79.3, 300.0, 32.0,
                "NVIDIA A100 datasheet: bf16 312 TFLOPS dense; NVLink 3 600 GB/s both ways; PCIe 4"),
    "a800": Gpu("A800 SXM 80GB", 312.0, 79.3, 200.0, 32.0,
                "NVIDIA A800 datasheet: bf16 312 TFLOPS dense (as A100); NVLink 400 GB/s both ways; PCIe 4"),
    "h20": Gpu("H20 96GB", 148.0, 95.0, 450.0, 64.0,
               "NVIDIA H20 product brief: bf16 148 TFLOPS dense; 96 GB HBM3; NVLink 900 GB/s both ways; PCIe 5"),
    "l40s": Gpu("L40S 48GB", 362.05, 45.0, None, 32.0,
                "NVIDIA L40S datasheet: bf16 733 TFLOPS with sparsity; no NVLink; PCIe 4"),
    "l20": Gpu("L20 48GB", 119.5, 45.0, None, 32.0,
               "NVIDIA L20 product brief: bf16 239 TFLOPS with sparsity; no NVLink; PCIe 4"),
}

INTERCONNECTS = ("nvlink", "pcie", "ib")
IB_GBPS = 50.0
"""InfiniBand NDR, 400 Gb/s per GPU (one ConnectX-7 per GPU, as in DGX H100), per direction."""

EFFICIENCY = 0.45
"""Share of the dense bf16 peak a forward achieves, uncalibrated: an assumption (bf16 GEMMs and
flash attention reach 50-70% of peak at these sizes on Hopper; norms, RoPE and modulation are
memory-bound work the FLOP count leaves out). Not fitted to the published anchors that
benchmarks/plan_vs_published.py compares against."""

USABLE_MEMORY = 0.92
"""Share of the card's memory a plan may fill: the CUDA context, NCCL's buffers and the caching
allocator's fragmentation take the rest (an assumption, about 6 GiB of 80)."""


def link_gbps(gpu: Gpu, interconnect: str) -> float:
    """Bandwidth of one GPU's link inside a node."""
    if interconnect == "nvlink":
        return gpu.nvlink_gbps or gpu.pcie_gbps
    if interconnect == "ib":
        return IB_GBPS
    return gpu.pcie_gbps


@dataclass(frozen=True)
class Calibration:
    efficiency: float
    source: str


def calibration_file(gpu_key: str, results: Path) -> Path | None:
    """The newest result file of benchmarks/gpu_suite.py for this GPU (its name carries the
    device name torch reports, e.g. 2026-12-01-gpu-suite-nvidia-h100-80gb-hbm3.md)."""
    if not results.is_dir():
        return None
    found = sorted(p for p in results.glob("*-gpu-suite-*.md")
                   if re.search(rf"(^|-){gpu_key}(-|\.|$)", p.name.split("-gpu-suite-", 1)[1]))
    return found[-1] if found else None


FORWARD_SECTION = "## one forward, per-rank share of Ulysses N (compute only)"


def suite_forward_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the suite's per-rank forward table (case, ranks, tokens, seconds, ...)."""
    rows, keys, inside = [], None, False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == FORWARD_SECTION
            continue
        if not inside or not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if keys is None:
            keys = cells
        else:
            rows.append(dict(zip(keys, cells)))
    return rows
