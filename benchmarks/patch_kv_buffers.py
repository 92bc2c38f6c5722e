"""Per-rank memory of displaced patch parallelism's stale K/V buffers: at real shapes from shape
arithmetic (bf16), and measured at a tiny shape on 2 gloo ranks (CPU), for the current
parallel/patch.py and, with --before REV, for the file at a git revision (the layout before
2026-11-23: per-rank chunk lists, concatenated into a new whole-sequence copy every step).

The measurement drives DisplacedKV directly, as the engine's attention processors do (per step,
per guidance branch, per layer: fresh K, V and queries for this rank's chunk, the exchange, the
attention), and follows every tensor storage that torch operators allocate on this rank's thread
(a dispatch mode, with weak references to see when each is freed): the bytes allocated per step,
the bytes still alive at the end of a step (what the buffers hold, plus anything a pending
all-gather keeps alive), and the peak within a step. The attention's own outputs are left out
(the same in every layout); allocations inside a communication backend (gloo's own staging) are
not operators and are not seen. It also checks that PipeFusion's PipeStage.refresh allocates
nothing after its buffers exist.

    python benchmarks/patch_kv_buffers.py [--before 19995f1] [--write benchmarks/results/DATE-patch-kv-buffers.md]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from multirank import run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The tiny Wan of the tests: 64x64, 9 frames -> 48 tokens, 4 heads x 12, 3 blocks, two branches.
TINY = dict(tokens=48, heads=4, head_dim=12, layers=3, branches=2)
STEPS, WARMUP = 4, 1

# name, video tokens, heads, attention layers, guidance branches per step on each rank
MODELS = [("Wan 2.1 14B, 720x1280x81", 21 * 45 * 80, 40, 40, 2),
          ("Wan 2.1 1.3B, 480x832x81", 21 * 30 * 52, 12, 30, 2),
          ("HunyuanVideo 13B, 720x1280x129", 33 * 45 * 80, 24, 60, 1)]
HEAD_DIM, BF16 = 128, 2


class _Allocations(TorchDispatchMode):
    """Storages that operators allocate while active (not while `paused`), with their sizes; the
    peak of those still alive, sampled after every operator."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        """data pointer -> (weak reference, bytes)"""
        self.paused = False
        self.allocated = 0
        self.peak = 0

    def live(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            inputs = {t.untyped_storage().data_ptr() for t in tensors}
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                    continue
                storage = t.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if storage.data_ptr() not in inputs and (known is None or known[0].expired()):
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.allocated += storage.nbytes()
        self.peak = max(self.peak, self.live())
        return out


def _module(source: str | None):
    """unison.parallel.patch, or the same file's text from another revision, as a module."""
    if source is None:
        import unison.parallel.patch as patch

        return patch
    module = types.ModuleType("patch_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "patch_before.py", "exec"), module.__dict__)
    return module


def _measure(rank: int, world: int, source: str | None) -> list[dict]:
    from unison.parallel.attention import sdpa

    patch = _module(source)
    kv = patch.DisplacedKV(group=dist.group.WORLD, size=world, index=rank, warmup_steps=WARMUP)
    chunk = -(-TINY["tokens"] // world)
    shape = (1, chunk, TINY["heads"], TINY["head_dim"])
    takes_attend = "attend" in inspect.signature(kv.exchange).parameters
    tracker, rows = _Allocations(), []
    torch.manual_seed(rank)

    def attend(keys, values):
        tracker.paused = True
        out = sdpa(q, keys, values)
        tracker.paused = False
        return out

    with tracker:
        for step in range(STEPS):
            kv.begin_step(step)
            tracker.allocated, tracker.peak, fresh = 0, tracker.live(), 0
            for branch in ("cond", "uncond")[:TINY["branches"]]:
                kv.branch = branch
                for layer in range(TINY["layers"]):
                    k, v = torch.randn(shape), torch.randn(shape)
                    fresh += 2 * k.nbytes
                    tracker.paused = True
                    q = torch.randn(shape)
                    tracker.paused = False
                    if takes_attend:
                        out = kv.exchange(layer, k, v, attend)
                    else:  # before: exchange returned the whole-sequence tensors
                        out = attend(*kv.exchange(layer, [k, v]))
                    del k, v, q, out
            time.sleep(0.1)  # gloo's worker thread lets go of finished collectives (and their tensors) soon after
            rows.append(dict(step=step, allocated=tracker.allocated - fresh, fresh=fresh, peak=tracker.peak,
                             end=tracker.live(), held=kv.held_bytes()))
    kv.reset()
    return rows


def _pipefusion_allocations() -> list[int]:
    """Bytes operators allocate per step in PipeStage.refresh: 3 layers, two branches, 3 patches
    after a whole-sequence first step (one process; refresh does not communicate)."""
    from unison.parallel.pipefusion import PipeStage, patch_ranges

    stage = PipeStage(group=None, size=1, index=0, warmup_steps=1, patches=3)
    length, heads, dim = TINY["tokens"], TINY["heads"], TINY["head_dim"]
    tracker, per_step = _Allocations(), []
    with tracker:
        for step in range(STEPS):
            stage.begin_step(step)
            tracker.allocated = 0
            for branch in ("cond", "uncond"):
                stage.branch = branch
                for a, b in [(0, length)] if step == 0 else patch_ranges(length, 3):
                    stage.span = (a, b, length)
                    for layer in range(TINY["layers"]):
                        tracker.paused = True
                        k, v = torch.randn(1, b - a, heads, dim), torch.randn(1, b - a, heads, dim)
                        tracker.paused = False
                        stage.refresh(layer, k, v)
            per_step.append(tracker.allocated)
    return per_step


def real_shapes() -> list[str]:
    """Per rank, bf16. F: one layer's whole-sequence K and V (padded to a multiple of P)."""
    gib = 2 ** 30
    out = ["| model | patch | F: one layer's K+V GiB | before: buffers GiB | before: transient in a displaced step "
           "GiB | before: peak GiB | after: buffers = peak GiB | before, besides: fresh chunks kept by pending "
           "all-gathers GiB | concatenation written per displaced step GiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, tokens, heads, layers, branches in MODELS:
        for p in (2, 4, 8):
            f = 2 * p * -(-tokens // p) * heads * HEAD_DIM * BF16
            buffers = layers * branches * f
            out.append(f"| {name}, {branches} branch{'es' if branches > 1 else ''} | {p} | {f / gib:.2f} | "
                       f"{buffers / gib:.1f} | {2 * f / gib:.2f} | {(buffers + 2 * f) / gib:.1f} | "
                       f"{buffers / gib:.1f} | {buffers / p / gib:.1f} | {buffers / gib:.1f} |")
    return out


def _tiny_formula(world: int) -> dict[str, int]:
    f = 2 * world * -(-TINY["tokens"] // world) * TINY["heads"] * TINY["head_dim"] * 4  # float32
    n = TINY["layers"] * TINY["branches"]
    return dict(F=f, buffers=n * f, pending=n * f // world)


def report(after: list[dict], before: list[dict] | None, before_rev: str | None, pipefusion: list[int]) -> str:
    formula = _tiny_formula(2)
    out = [f"# Displaced patch parallelism: stale K/V buffers per rank, before and after ({datetime.date.today()})", "",
           f"Device: CPU only ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, gloo; no GPU "
           "was used. Produced by `python benchmarks/patch_kv_buffers.py"
           + (f" --before {before_rev}`" if before_rev else "`") + ". Real-shape figures are computed from shapes "
           "(bf16), not measured; the tiny-shape figures are measured.", "",
           "Before: each rank kept, per guidance branch and attention layer, a list of every rank's K and V chunks; "
           "every displaced step concatenated them into a new whole-sequence copy, allocated a new list of chunks for "
           "the next asynchronous all-gather, and the pending all-gather kept this step's fresh chunk alive until the "
           "next step. After: one whole-sequence K and one V buffer per branch and layer, laid out (batch, patch "
           "rank, chunk, heads, head_dim), allocated once; the all-gather writes every rank's chunk straight into "
           "them (in place: its input is this rank's own slot), and attention reads them as they are.", "",
           "## Real shapes (per rank, bf16)", "",
           "F is one layer's whole-sequence K and V (every layer and branch has one). Before: the chunk lists "
           "(F each), and in a displaced step a transient 2F for the layer being exchanged (its concatenated copy, and "
           "the next step's chunk list allocated while the old one was still referenced); after: the buffers only, "
           "nothing allocated per step. Besides, before, each pending all-gather kept this step's fresh chunk (F/P) "
           "alive: until the next step's wait() on gloo (measured below) and on NCCL where it stashes the inputs of "
           "asynchronous collectives (TORCH_NCCL_AVOID_RECORD_STREAMS=1); with NCCL's default recordStream the "
           "allocator can reuse the block once the transfer ends. After, the all-gather's input is the buffer's own "
           "slot. The last column is what the removed concatenation wrote to memory every displaced step.",
           ""]
    out += real_shapes()
    out += ["", f"## Measured at the tiny Wan shape (2 gloo ranks, patch 2, float32, {TINY['tokens']} tokens, "
            f"{TINY['heads']} heads x {TINY['head_dim']}, {TINY['layers']} layers, {TINY['branches']} branches, "
            f"{STEPS} steps, warm-up {WARMUP})", "",
            f"Formula at this shape: F = {formula['F']} B, buffers = {formula['buffers']} B, fresh chunks of "
            f"pending all-gathers = {formula['pending']} B. Rank 0. 'Allocated by the exchange': bytes of the "
            "storages operators allocated in the step, less the fresh K and V that the driver makes for every "
            "layer (standing in for the model's projections); the attention's output is left out. 'Alive at "
            "end' and 'peak': bytes of the storages allocated so far (buffers and fresh K/V included) still "
            "alive at the end of the step, and the most alive at once during it.", "",
            "| version | step | mode | allocated by the exchange B | fresh K/V B | alive at end B | peak B | "
            "held_bytes() B |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for label, rows in (("before", before), ("after", after)):
        for row in rows or []:
            mode = "synchronous" if row["step"] < WARMUP else "displaced"
            out.append(f"| {label} | {row['step']} | {mode} | {row['allocated']} | {row['fresh']} | {row['end']} | "
                       f"{row['peak']} | {row['held']} |")
    f, n = formula["F"], TINY["layers"] * TINY["branches"]
    out += ["", f"The measurement is the formula: before, a displaced step allocated 2F per layer and branch ({n} x 2F "
            f"= {2 * n * f} B: the concatenated copy and the next chunk list), kept the buffers and the pending "
            f"all-gathers' fresh chunks alive ({formula['buffers']} + {formula['pending']} = "
            f"{formula['buffers'] + formula['pending']} B) and peaked 2F above that "
            f"({formula['buffers'] + formula['pending'] + 2 * f} B); after, the exchange allocates nothing after "
            f"the first step, what stays alive is the buffers ({formula['buffers']} B, equal to held_bytes() and to "
            "unison.parallel.cost.stale_kv_bytes), and the peak is the buffers plus one layer's fresh K and V "
            f"({formula['buffers'] + f // 2} B), which the model makes in either version."]
    out += ["", f"PipeFusion's PipeStage.refresh (3 layers, two branches, 3 patches after a whole-sequence step 0): "
            f"bytes allocated per step {pipefusion}: its buffers are allocated in the first step and refilled in "
            "place after, with no per-step allocation.", "",
            "Not changed here: HunyuanVideo's joint attention (`_over` in parallel/attention.py, used by displaced "
            "patches and by PipeFusion) concatenates the whole-sequence video K/V with the text K/V for every layer "
            "(PipeFusion: for every patch), a transient copy of about F per layer that Wan does not pay."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="also measure parallel/patch.py as it was at this git revision")
    parser.add_argument("--write", help="also write the report here")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    after = run_ranks(2, _measure, None)[0]
    before = None
    if args.before:
        source = subprocess.run(["git", "show", f"{args.before}:parallel/patch.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        before = run_ranks(2, _measure, source)[0]
    text = report(after, before, args.before, _pipefusion_allocations())
    print(text)
    if args.write:
        Path(args.write).write_text(text)
