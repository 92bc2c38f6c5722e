"""A GPU suite result as a calibration for `unison plan`: the share of the dense bf16 peak that
the suite's measured per-rank forwards reached on that GPU.

benchmarks/gpu_suite.py times one real-size forward per rank share (Ulysses N simulated on one
GPU, communication left out) and writes them as a markdown table; for each row the planner counts
the same forward's FLOPs on the meta device, and the median of FLOPs / (seconds x peak) is the
efficiency it projects with.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from unison.engine.planner import model as plan_model
from unison.engine.planner.hardware import GPUS, Calibration, suite_forward_rows
from unison.engine.planner.model import ceil_div

from unison.engine.models import checkpoints

CASE_NAME = re.compile(r"(.+?) (\d+)x(\d+)x(\d+)$")
"""A suite case's name: its checkpoint's suite_case, then the video's height x width x frames."""


def efficiency_from_suite(path: Path, gpu_key: str) -> Calibration:
    peak = GPUS[gpu_key].bf16_tflops * 1e12
    # The suite's case names (benchmarks/gpu_suite.py real_cases) and the published checkpoint of each.
    suite_cases = {c.suite_case: c.name for _, c in checkpoints().values() if c.suite_case}
    ratios = []
    for row in suite_forward_rows(path):
        match = CASE_NAME.match(row.get("case", ""))
        name = suite_cases.get(match.group(1)) if match else None
        try:
            seconds, ranks = float(row["seconds"]), int(row["ranks"])
        except (KeyError, ValueError):
            continue
        if name is None:
            continue
        height, width, frames = (int(g) for g in match.groups()[1:])
        spec, parts = plan_model.published(name)
        latent = plan_model.latent_shape(spec, parts, height=height, width=width, frames=frames)
        model = plan_model.RealModel(spec, parts, latent, spec.defaults.max_sequence_length)
        count = model.flops_at(ceil_div(model.video_tokens, ranks))
        ratios.append((count.linear + count.attention / ranks + count.other) / seconds / peak)
    if not ratios:
        from unison.engine.planner.hardware import EFFICIENCY

        return Calibration(EFFICIENCY, f"uncalibrated: {path.name} has no per-rank forward rows to read; "
                           f"{EFFICIENCY:.0%} of the dense bf16 peak assumed")
    efficiency = statistics.median(ratios)
    return Calibration(efficiency, f"calibrated: {efficiency:.0%} of the dense bf16 peak, the median of "
                       f"{len(ratios)} forwards measured in {path.name}")
