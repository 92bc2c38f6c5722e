"""`unison plan`: which layout for N GPUs, will it fit, how long will it take; printed as a table.

The numbers come from engine/planner/layouts.py (memory, FLOPs, bytes and projected time per layout);
this module turns command-line input into a model and a setting, refuses bad input with one line,
and prints the ranking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from unison.engine.planner import model as plan_model
from unison.engine.config import RunConfig, config_from_dict
from unison.engine.images import stand_in_picture
from unison.engine.planner.hardware import (EFFICIENCY, GPUS, INTERCONNECTS, USABLE_MEMORY, Calibration, calibration_file,
                                    link_gbps)
from unison.engine.models import checkpoints, get_spec
from unison.engine.planner.layouts import Layout, Row, Setting, cache_setting, explain, rank
from unison.engine.errors import UserError

COUNTS_CACHE = Path.home() / ".cache" / "unison" / "plan-counts.json"
FILTERS = ("ulysses", "ring", "cfg", "patch")
MAX_GPUS = 4096
"""One engine over more GPUs than this is no plan anyone runs (and the search would be slow)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What `unison plan` was asked, beyond the run config."""

    gpus: int
    nodes: int = 1
    gpu: str = "h100"
    interconnect: str | None = None
    family: str | None = None
    skip_share: float | None = None
    only: dict = dataclasses.field(default_factory=dict)
    """Degrees the user fixed (--ulysses 4 ...): only layouts with them."""
    counts_cache: Path | None = COUNTS_CACHE
    results: Path = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def real_model(config: RunConfig, request: Request) -> tuple[plan_model.RealModel, object]:
    """The model at the requested size, and the resolved sampling settings."""
    from unison.engine.plan import _resolve_family, _resolve_sampling, check_sampling
    from unison.engine.limits import check_limits, config_reader

    path = config.model.path
    # A recipe may name a Hub id: with no local copy, plan uses that checkpoint's published configs.
    hub_ids = {hub: c.name for _, c in checkpoints().values() for hub in c.hub_ids}
    name = request.family or (hub_ids.get(path) if path and not Path(path).exists() else None)
    if name is None and path is None and plan_model.published_name(config.model.family) in checkpoints():
        name = config.model.family  # a family that names one published checkpoint
    if name is not None:
        spec, parts = plan_model.published(name)
    elif path is not None:
        family, index = _resolve_family(config.model)
        spec = get_spec(family)
        parts = plan_model.from_folder(path, spec, index)
    else:
        raise UserError(f"plan needs --family (one of {', '.join(checkpoints())}) or --model DIR")
    # A folder's own configs, or a published model's, bound the video and may size it.
    read = config_reader(config.model, spec) if name is None else _published_reader(parts)
    sampling = stand_in_picture(_resolve_sampling(config.sampling, spec, tiny=False, read=read), spec)
    check_sampling(sampling, spec)
    check_limits(sampling, spec, config.model, read=read)
    # A diffusion-forcing video passes through the model a window at a time.
    latent = plan_model.latent_shape(spec, parts, height=sampling.height, width=sampling.width,
                                     frames=sampling.window_frames if spec.forcing else sampling.frames)
    cache = plan_model.meta_model.CountCache(request.counts_cache)
    model = plan_model.RealModel(spec, parts, latent, sampling.max_sequence_length, cache=cache,
                                 name=plan_model.published_name(name) if name else path)
    return model, sampling


def _published_reader(parts: dict):
    """read("transformer/config.json") for a published model: its configs as plan_model lists them."""
    def read(name: str) -> dict:
        part, _, file = name.partition("/")
        return dict(parts[part][2]) if file == "config.json" and part in parts else {}

    return read


def check_request(request: Request) -> None:
    if request.gpu not in GPUS:
        raise UserError(f"unknown GPU '{request.gpu}'; known: {', '.join(GPUS)}")
    if request.interconnect is not None and request.interconnect not in INTERCONNECTS:
        raise UserError(f"unknown interconnect '{request.interconnect}'; known: {', '.join(INTERCONNECTS)}")
    if request.interconnect == "nvlink" and GPUS[request.gpu].nvlink_gbps is None:
        raise UserError(f"the {GPUS[request.gpu].name} has no NVLink; use --interconnect pcie")
    if request.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {request.nodes}")
    if request.skip_share is not None and not 0 <= request.skip_share < 1:
        raise UserError(f"--skip-share must be in [0, 1), got {request.skip_share}")


def make_setting(model, sampling, config: RunConfig, request: Request, gpus: int) -> Setting:
    gpu = GPUS[request.gpu]
    # The skip share (given, the kind's schedule's, or the share it assumes) and the state per
    # token come from the cache kind's registry entry (caching/planning.py).
    rows = _window_rows(model.spec, sampling)
    cache = cache_setting(model, config.cache, steps=max(rows), skip_share=request.skip_share)
    return Setting(gpu=gpu, gpus=gpus, nodes=request.nodes,
                   interconnect=request.interconnect or ("nvlink" if gpu.nvlink_gbps else "pcie"),
                   steps=sum(rows), windows=len(rows), branches=model.spec.hooks.branches(sampling), **cache,
                   encode_frames=model.spec.hooks.condition_frames(sampling),
                   patch_warmup_steps=config.parallel.patch_warmup_steps,
                   pipefusion_patches=config.parallel.pipefusion_patches, vae_tiling=config.output.vae_tiling,
                   efficiency=calibrated(request).efficiency,
                   refuses=lambda layout: model.spec.hooks.layout_problem(sampling, layout))


def _window_rows(spec, sampling) -> list[int]:
    """Forwards per window (diffusion forcing: diffusers' step matrix per window), else [steps]."""
    if not spec.forcing:
        return [sampling.steps]
    from unison.engine import windows

    return windows.rows(sampling, spec.hooks, temporal=spec.temporal_factor)


def calibrated(request: Request) -> Calibration:
    found = calibration_file(request.gpu, request.results)
    if found is None:
        return Calibration(EFFICIENCY, f"uncalibrated: {EFFICIENCY:.0%} of the dense bf16 peak assumed "
                           f"(no benchmarks/gpu_suite.py result for {request.gpu} in {request.results.name}/)")
    from unison.launch.calibrate import efficiency_from_suite

    return efficiency_from_suite(found, request.gpu)


def _matches(layout: Layout, only: dict) -> bool:
    return all(getattr(layout, axis) == value for axis, value in only.items())


def plan_rows(model, setting: Setting, only: dict) -> tuple[list[Row], list]:
    rows, refused = rank(model, setting)
    kept = explain([r for r in rows if _matches(r.layout, only)], setting)
    return kept, [(l, why) for l, why in refused if _matches(l, only)]


def check_layouts(model, sampling, config, request: Request) -> tuple[Setting, list[Row], list]:
    """The ranked rows for the request, or the one-line error that says why there are none."""
    n = request.gpus
    if not 1 <= n <= MAX_GPUS:
        raise UserError(f"--gpus must be between 1 and {MAX_GPUS}, got {n}")
    if n % request.nodes:
        near = sorted({max(request.nodes, n // request.nodes * request.nodes), -(-n // request.nodes) * request.nodes})
        raise UserError(f"{n} GPUs do not split evenly over {request.nodes} nodes; nearest counts that do: "
                        f"{' or '.join(map(str, near))}")
    ulysses = request.only.get("ulysses")
    if ulysses is not None and model.heads % ulysses:
        room = n // max(1, request.only.get("cfg", 1) * request.only.get("patch", 1) * request.only.get("ring", 1))
        work = [d for d in range(1, room + 1) if model.heads % d == 0 and room % d == 0]
        raise UserError(f"Ulysses degree {ulysses} does not divide the model's {model.heads} attention heads; "
                        f"Ulysses degrees that work on {n} GPUs: {', '.join(map(str, work)) or 'none'} "
                        f"(ring takes any degree)")
    setting = make_setting(model, sampling, config, request, n)
    rows, refused = plan_rows(model, setting, request.only)
    if not rows:
        near = _nearest_usable(model, sampling, config, request)
        why = f" ({refused[0][1]})" if refused else ""
        fixed = " x ".join(f"{k} {v}" for k, v in request.only.items())
        raise UserError(f"no layout uses {n} GPUs" + (f" with {fixed}" if fixed else "") + why
                        + (f"; nearest GPU count that can: {near}" if near else ""))
    if not any(r.fits for r in rows):
        best = min(rows, key=lambda r: r.peak)
        need = best.peak / USABLE_MEMORY / 2**30
        bigger = [g for g in GPUS.values() if g.memory_gib >= need]
        fix = (f"the smallest GPU that would: {min(bigger, key=lambda g: g.memory_gib).name} "
               f"({min(g.memory_gib for g in bigger):.0f} GiB)") if bigger else \
              f"no known GPU has that much (largest {max(g.memory_gib for g in GPUS.values()):.0f} GiB)"
        raise UserError(f"{sampling.width}x{sampling.height}, {sampling.frames} frames does not fit any layout on "
                        f"{n} x {setting.gpu.name}: the smallest needs {need:.1f} GiB per GPU ({best.layout.name()}); "
                        f"{fix}; or use more GPUs or a smaller video")
    return setting, rows, refused


def _nearest_usable(model, sampling, config, request: Request) -> int | None:
    for delta in range(1, 65):
        for n in (request.gpus - delta, request.gpus + delta):
            if n >= 1 and n % request.nodes == 0:
                setting = make_setting(model, sampling, config, request, n)
                from unison.engine.planner.layouts import layouts

                if any(_matches(l, request.only) for l in layouts(model, setting)[0]):
                    return n
    return None


MEMORY_COLUMNS = ("weight", "text", "act", "K/V", "cache", "VAE")
"""GiB per rank by part (engine/planner.memory): weights, text encoders, activations, stale K/V,
cache state, and the VAE (its weights and what decoding needs beyond the denoising peak)."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}" if n else "-"


SENT_NAMES = {"all_to_all": "a2a", "ring_p2p": "ring~", "all_gather": "ag", "all_gather_async": "ag~",
              "fsdp_all_gather": "fsdp~", "p2p": "p2p", "broadcast": "bcast"}
"""Short names of the collectives in the table; ~ marks an exchange that overlaps compute."""


def format_plan(model, sampling, setting: Setting, rows: list[Row], refused: list, calibration: Calibration) -> str:
    spec, gpu = model.spec, setting.gpu
    whole = model.flops()
    guidance = {1: "one branch per step", 2: "CFG: two branches per step"}[setting.branches]
    cache = "no cache" if setting.cache == "none" else \
        f"{setting.cache}, {setting.skip_share:.0%} of steps skipped ({setting.skip_source})"
    link = link_gbps(gpu, setting.interconnect)
    lines = [
        f"unison plan: {spec.title} [{model.name}], {sampling.width}x{sampling.height}, {sampling.frames} frames, "
        f"{setting.steps} steps, {guidance}, {cache}",
        *([f"  diffusion forcing: {setting.windows} windows of {sampling.window_frames} frames"
           + (f" ({sampling.overlap_frames} overlapping)" if setting.windows > 1 else "")
           + f", {setting.steps} forwards in all (s/step is one forward of a full window; s/video counts every "
             f"window full)"] if spec.forcing else []),
        f"  {model.video_tokens} video tokens, {model.heads} heads x {model.head_dim}, {model.attentions} attentions "
        f"per forward; one forward counted on the meta device: {whole.linear / 1e15:.3f} PFLOP linear + "
        f"{whole.attention / 1e15:.3f} PFLOP attention",
        f"  {setting.gpus} x {gpu.name} ({gpu.bf16_tflops:g} TFLOPS dense bf16, {gpu.memory_gib:g} GiB, "
        f"{gpu.memory_gib * USABLE_MEMORY:.1f} usable) on {setting.nodes} node(s), "
        f"{setting.interconnect} {link:g} GB/s per direction" + (", IB 50 GB/s across nodes" if setting.nodes > 1 else ""),
        f"  PROJECTION, {calibration.source}; communication at the link's bandwidth; text encoding and VAE "
        f"decode time not included",
        "",
        f"  {'#':>3} {'layout':<44} {'fits':<4} {'GiB/rank':>8}  {''.join(f'{c:>6}' for c in MEMORY_COLUMNS)}  "
        f"{'TFLOP/step':>10}  {'MiB/step sent (~ overlaps)':<30} {'s/step':>7} {'s/video':>8}  why not first",
    ]
    for i, row in enumerate(rows, 1):
        m = row.memory
        values = [m["weights"], m["text encoders"], m["activations"], m["stale K/V"], m["cache state"],
                  m["VAE"] + m["VAE decode"] + m["VAE encode"]]
        parts = "".join(f"{_gib(v):>6}" for v in values)
        sent = " ".join(f"{SENT_NAMES.get(k, k)} {v / 2**20:,.0f}" for k, v in row.sent.items()) or "-"
        mark = "*" if i == 1 and row.fits else " "
        why = "recommended" if i == 1 and row.fits else "; ".join(row.reasons)
        lines.append(f"  {i:>3}{mark}{row.layout.name():<44} {'yes' if row.fits else 'no':<4} {row.peak / 2**30:>8.1f}  "
                     f"{parts}  {sum(row.flops.values()) / 1e12:>10,.0f}  {sent:<30} {row.step_s:>7.2f} "
                     f"{row.video_s:>8.0f}  {why}")
    if refused:
        lines += ["", "  refused by the engine:"]
        for layout, why in refused:
            lines.append(f"      {layout.name():<44} {why}")
    return "\n".join(lines)


def lora_line(config: RunConfig, spec) -> str:
    """What the config's LoRAs cost: nothing on the GPU or per step (fused into the weights), and
    the host copy of the weights they change, from the files' shapes (engine/lora.py)."""
    from unison.engine import lora

    absent = [entry.path for entry in config.lora if not Path(entry.path).exists()]
    head = f"  LoRA: {len(config.lora)} file(s) fused into the weights before the steps: no GPU memory and no time per step"
    if absent:  # a recipe planned before its LoRAs are downloaded
        return f"{head}; the host copy of what they change is not counted ({absent[0]} is not here)"
    loras = lora.check(config.lora, spec, read=None)
    weights, size = lora.host_copy(loras, spec, dtype_bytes=2)
    return (f"{head}; the originals of the {weights} weights they change wait on the host to switch exactly: "
            f"{_gib(size) if size else '0.0'} GiB in bf16 per rank (divided by the shard degree with shard_weights)")


def _gpu_here() -> tuple[str, str]:
    """The known GPU this process sees, and a note when there is none."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        for key in GPUS:
            if key in name.replace(" ", ""):
                return key, ""
        return "h100", f" ({torch.cuda.get_device_name(0)} is not in the table: ranked with H100 figures)"
    return "h100", " (no GPU here: ranked with H100 figures)"


def auto_layout(config: RunConfig, *, world_size: int, nodes: int = 1) -> tuple[RunConfig, str]:
    """`parallel.auto`: the config with the recommended layout for `world_size` ranks, and a line
    naming the choice and the runner-up. Degrees above 1 in the config are kept as constraints."""
    gpu, note = _gpu_here()
    p = config.parallel
    only = {axis: getattr(p, axis) for axis in FILTERS if getattr(p, axis) > 1}
    # The ranks are taken to share one node's link (the launchers do not say how many nodes).
    request = Request(gpus=world_size, nodes=nodes if world_size % nodes == 0 else 1, gpu=gpu, only=only)
    if config.model.path is None:
        model, sampling = _tiny_model(config, request)
    else:
        model, sampling = real_model(config, request)
    _, rows, _ = check_layouts(model, sampling, config, request)
    best = rows[0]
    layout = best.layout
    chosen = config_from_dict({
        "parallel": dict(auto=False, ulysses=layout.ulysses, ring=layout.ring, cfg=layout.cfg, patch=layout.patch,
                         patch_mode="pipefusion" if layout.pipefusion else p.patch_mode if layout.patch > 1
                         else "displaced",
                         shard_weights=layout.shard_weights),
        "model": {"offload": layout.offload or config.model.offload},
        "output": {"vae_tiling": layout.vae_tiling or config.output.vae_tiling}}, base=config)
    runner = next((r for r in rows[1:] if r.fits and (r.layout.ulysses, r.layout.ring, r.layout.cfg, r.layout.patch)
                   != (layout.ulysses, layout.ring, layout.cfg, layout.patch)), None)
    line = (f"parallel auto on {world_size} rank(s){note}: {layout.name()}, projected {best.step_s:.3g} s/step"
            + (f"; runner-up {runner.layout.name()} ({runner.step_s / best.step_s - 1:+.0%})" if runner else ""))
    return chosen, line


def _tiny_model(config: RunConfig, request: Request):
    from unison.engine.plan import _resolve_family, _resolve_sampling, check_sampling

    spec = get_spec(_resolve_family(config.model)[0])
    parts = plan_model.from_pipeline(spec.build_tiny(config.model.tiny_seed), spec)
    sampling = stand_in_picture(_resolve_sampling(config.sampling, spec, tiny=True), spec)
    check_sampling(sampling, spec)
    latent = plan_model.latent_shape(spec, parts, height=sampling.height, width=sampling.width, frames=sampling.frames)
    return plan_model.RealModel(spec, parts, latent, sampling.max_sequence_length,
                                cache=plan_model.meta_model.CountCache(request.counts_cache), name="tiny"), sampling
