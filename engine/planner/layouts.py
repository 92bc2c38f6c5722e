"""`unison plan`: every parallel layout of a run over N GPUs, with its memory per rank, FLOPs and
bytes per step per rank, and projected time; ranked, the best that fits recommended.

Memory per rank (bf16 weights and activations, float32 VAE):
- weights: every expert's parameters, counted on the meta device (engine/planner/model.py); the
  transformer blocks 1/N under shard_weights, ceil(layers/P)/layers of them on a PipeFusion
  stage; with offload only the expert in use (Wan 2.2 A14B) and no text encoder while denoising;
- text encoders: resident, or (offload) on the GPU only while encoding: then what encoding needs
  beyond the denoising and decoding peaks;
- activations: the peak of one block's forward at the rank's tokens, traced on the meta device;
  plus the attention kernel's log-sum-exp (float32 per query and head) and the collective's
  staging (Ulysses: its send and receive buffers, q/k/v-sized; Ring: the next K/V chunk);
- stale K/V buffers of patch parallelism (parallel/cost.stale_kv_bytes);
- cache state: what the cache kind says it keeps per token (its registry entry's
  `state_per_token`, caching/planning.py), for the rank's tokens, per guidance branch and expert;
- VAE decode peak (float32): whole when one rank decodes untiled, else one 256-pixel tile plus
  the decoded tiles and the blended video, traced on the meta device;
- image-to-video: the VAE encode of the condition (Wan I2V: the picture and black frames, the
  whole video; TI2V-5B: one frame), float32, untiled, traced on the meta device; every rank
  encodes it before the loop. The traces count tensors only: a base_dim-16 Wan VAE on the CPU
  measured 1.44-1.48x the encode trace and 1.11-1.13x the decode trace
  (benchmarks/results/2026-11-24-vae-trace-vs-cpu.md), so read both as lower bounds.
Time is a projection: FLOPs at the GPU's dense bf16 peak times an efficiency (hardware.py), bytes
at the link's bandwidth; Ring's K/V passes, FSDP's weight gathers and displaced patches' K/V
(after warm-up) overlap compute, the rest adds to it. Text encoding and VAE decode are left out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from unison.caching import registry
from unison.caching.base import CacheConfig
from unison.caching.planning import ModelShape, StepWork
from unison.engine.planner.hardware import EFFICIENCY, IB_GBPS, USABLE_MEMORY, Gpu, link_gbps
from unison.engine.planner.model import RealModel, ceil_div, gib
from unison.parallel.cost import TransformerShape, bytes_per_step, pipefusion_bytes_per_step, stale_kv_bytes

BF16 = 2
OVERLAPPED = {"ring_p2p", "all_gather_async", "fsdp_all_gather"}
"""Exchanges that run while the rank computes (their time hides under compute)."""


@dataclass(frozen=True)
class Layout:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    patch: int = 1
    pipefusion: bool = False
    shard_weights: bool = False
    offload: bool = False
    vae_tiling: bool = False
    """One rank only (more ranks decode tiles in parallel anyway): decode with the VAE's tiling."""

    @property
    def world(self) -> int:
        return self.ulysses * self.ring * self.cfg * self.patch

    @property
    def tokens_split(self) -> int:
        return self.ulysses * self.ring * (1 if self.pipefusion else self.patch)

    @property
    def patch_mode(self) -> str:
        """As parallel.patch_mode says it (for the engine's layout rules)."""
        return "pipefusion" if self.pipefusion else "displaced"

    def name(self) -> str:
        parts = [f"{axis} {getattr(self, axis)}" for axis in ("ulysses", "ring", "cfg") if getattr(self, axis) > 1]
        if self.patch > 1:
            parts.append(f"{'pipefusion' if self.pipefusion else 'patch'} {self.patch}")
        name = " x ".join(parts) or "one GPU"
        return name + "".join(f" +{flag}" for flag in ("shard_weights", "offload", "vae_tiling") if getattr(self, flag))


@dataclass(frozen=True)
class Setting:
    """What the plan is for: the hardware and the run's options that change the numbers."""

    gpu: Gpu
    gpus: int
    nodes: int = 1
    interconnect: str = "nvlink"
    steps: int = 50
    """Forwards per video (per guidance branch): the steps, or a diffusion-forcing video's rows over
    all its windows."""
    windows: int = 1
    """Diffusion forcing: windows, each re-warming patch parallelism's stale K/V."""
    branches: int = 2
    """Guidance branches per step (2 with CFG, 1 for HunyuanVideo's embedded guidance)."""
    cache: str = registry.NONE
    """The cache kind (a name in caching/registry.py; an unknown one is refused)."""
    skip_share: float = 0.0
    """Share of the steps a cache skips (what a skip saves is the kind's `saves`)."""
    encode_frames: int = 0
    """Pixel frames the engine VAE-encodes before the loop (image-to-video's condition; 0: none)."""
    skip_source: str = "assumed"
    """Where skip_share comes from (assumed, given, its schedule)."""
    cache_states: float = 0.0
    """Hidden-size tensors per token the cache keeps per branch and expert (its kind's
    `state_per_token` for the run's config: `cache_setting`)."""
    patch_warmup_steps: int = 4
    pipefusion_patches: int | None = None
    vae_tiling: bool = False
    efficiency: float = EFFICIENCY
    refuses: Callable[[Any], str | None] | None = None
    """(layout) -> why the run's sampling settings cannot take it (the family's
    Hooks.layout_problem), or None."""

    def __post_init__(self):
        if self.cache != registry.NONE:
            registry.get(self.cache)  # ValueError naming the kinds


def cache_shape(model: RealModel) -> ModelShape:
    """The model's sizes as a cache kind reads them (caching/planning.py)."""
    pt, ph, pw = model.patch
    single = model.spec.meta.single_blocks(model.expert)
    return ModelShape(joint_text=model.spec.joint_text, blocks=model.attentions, single_blocks=single,
                      hidden=model.heads * model.head_dim,
                      out_per_token=int(model.expert.get("out_channels", 16)) * pt * ph * pw)


def cache_setting(model: RealModel, cache: CacheConfig, *, steps: int, skip_share: float | None) -> dict[str, Any]:
    """The Setting fields for `cache` (cache, skip_share, skip_source, cache_states), from what its
    kind declares: the share given, else the one its schedule says, else the share it assumes; its
    state per token at this model's shape. An unknown kind is a ValueError naming the kinds."""
    source = "assumed" if skip_share is None else "given"
    if cache.kind == registry.NONE:
        return dict(cache=cache.kind, skip_share=0.0, skip_source=source, cache_states=0)
    kind = registry.get(cache.kind)
    if skip_share is None and kind.schedule_skip_share is not None:
        skip_share, source = kind.schedule_skip_share(cache, steps), "its schedule"
    elif skip_share is None:
        skip_share = kind.default_skip_share
    return dict(cache=kind.name, skip_share=skip_share, skip_source=source,
                cache_states=kind.state_per_token(cache_shape(model), cache))


@dataclass
class Row:
    layout: Layout
    memory: dict[str, int]
    flops: dict[str, float]
    sent: dict[str, int]
    compute_s: float
    comm_s: float
    """Communication time left on the critical path (not hidden under compute)."""
    step_s: float
    video_s: float
    reasons: list[str] = field(default_factory=list)
    fits: bool = True

    @property
    def peak(self) -> int:
        return sum(self.memory.values())


def layouts(model: RealModel, setting: Setting) -> tuple[list[Layout], list[tuple[Layout, str]]]:
    """Every layout the engine takes on `setting.gpus` ranks, and those it refuses for this model
    with why. The engine's own rules decide (engine/plan.py's structure_problem, heads_problem and
    blocks_problem, which plan_run raises): a layout that breaks a rule of structure (patch with
    ring, ...) is no candidate at all; one this model's size rules out is listed as refused."""
    from unison.engine.plan import blocks_problem, heads_problem, structure_problem

    n, spec = setting.gpus, model.spec
    out, refused = [], []
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    degrees = [(cfg, patch, u, n // (cfg * patch * u)) for cfg in (1, 2) for patch in divisors for u in divisors
               if n % (cfg * patch * u) == 0]
    for (cfg, patch, ulysses, ring), pipefusion, shard, offload, tiling in itertools.product(
            degrees, (False, True), (False, True), (False, True), (False, True)):
        layout = Layout(cfg=cfg, patch=patch, ulysses=ulysses, ring=ring, pipefusion=pipefusion,
                        shard_weights=shard, offload=offload, vae_tiling=tiling)
        if shard and layout.world == 1:
            continue  # nothing to shard (the engine takes the flag and changes nothing)
        if tiling and (layout.world > 1 or setting.vae_tiling):
            continue  # tiled anyway
        if structure_problem(layout, spec=spec, branches=setting.branches) is not None:
            continue
        why = heads_problem(layout.ulysses, [model.heads]) or blocks_problem(layout, [model.attentions]) or \
            (setting.refuses(layout) if setting.refuses is not None else None)
        if why is None and layout.tokens_split > model.video_tokens:
            why = f"more ranks than the {model.video_tokens} video tokens"
        if why is None:
            out.append(layout)
        else:
            refused.append((layout, why))
    return out, refused


def _shape(model: RealModel) -> TransformerShape:
    c, f, h, w = model.latent
    return TransformerShape(video_tokens=model.video_tokens, heads=model.heads, head_dim=model.head_dim,
                            attentions=model.attentions, latent_elements=c * f * h * w,
                            joint_text_tokens=model.spec.meta.joint_text(model.text_tokens) if model.spec.joint_text else 0)


def _group_gbps(setting: Setting, span: int) -> float:
    """A group of `span` consecutive mesh ranks: inside one node its link, across nodes IB."""
    per_node = setting.gpus // setting.nodes
    return link_gbps(setting.gpu, setting.interconnect) if span <= per_node else IB_GBPS


def memory(model: RealModel, layout: Layout, setting: Setting) -> dict[str, int]:
    spec = model.spec
    experts = [model.parameters(e) for e in spec.experts]
    resident = experts[:1] if layout.offload and len(experts) > 1 and not layout.shard_weights else experts
    blocks = sum(p["blocks"] for p in resident)
    if layout.shard_weights:
        blocks = ceil_div(blocks, layout.world)
    elif layout.pipefusion:
        blocks = blocks * ceil_div(model.attentions, layout.patch) // model.attentions
    weights = (blocks + sum(p["other"] for p in resident)) * BF16
    # The text encoders in bfloat16; Wan 2.1 I2V's CLIP image encoder in float32 (engine/load.py).
    encoders = sum(sum(model.parameters(t).values()) * (4 if t == "image_encoder" else BF16)
                   for t in spec.text_encoders if t in model.parts)
    tokens = ceil_div(model.video_tokens, layout.tokens_split)
    if layout.pipefusion:
        tokens = ceil_div(model.video_tokens, setting.pipefusion_patches or layout.patch)
    hidden = model.heads * model.head_dim
    forwards = setting.branches // layout.cfg
    staging = 0
    if layout.ulysses > 1:
        staging += 2 * 3 * tokens * hidden * BF16
    if layout.ring > 1:
        staging += 2 * tokens * hidden * BF16
    kv = 0
    if layout.patch > 1:
        kv = stale_kv_bytes(_shape(model), mode="pipefusion" if layout.pipefusion else "displaced",
                            patch=layout.patch, ulysses=layout.ulysses, branches=forwards)
    contexts = forwards * len(spec.experts)
    cache = setting.cache_states * contexts * tokens * hidden * BF16
    denoise = model.activation_peak(tokens) + tokens * model.heads * 4 + staging
    vae_weights = sum(model.parameters("vae").values()) * 4
    untiled = layout.world == 1 and not (setting.vae_tiling or layout.vae_tiling)
    vae = model.vae_decode_peak(tiled=not untiled)
    # The phases come one after another: the peak is the weights plus the largest phase, not the
    # sum of all. Each entry after the denoising ones is what its phase needs beyond those before.
    denoising = denoise + kv + cache
    decode = max(0, vae - denoising)
    condition = model.vae_encode_peak(setting.encode_frames) if setting.encode_frames else 0
    vae_encode = max(0, condition - denoising - decode)
    # With offload the text encoders visit the GPU only to encode, beside the resident weights.
    encode = max(0, encoders - denoising - decode - vae_encode) if layout.offload else encoders
    return {"weights": weights, "text encoders": encode, "activations": denoise, "stale K/V": kv,
            "cache state": cache, "VAE": vae_weights, "VAE decode": decode, "VAE encode": vae_encode}


def flops(model: RealModel, layout: Layout) -> dict[str, float]:
    """One forward's FLOPs on one rank (the rank's shard of the tokens; its share of attention)."""
    if layout.pipefusion:
        # The busiest stage: its share of the blocks over every token, and (taken as the worst
        # case) all of the work outside the blocks: embeddings, text projection, output head.
        whole = model.flops()
        stage = ceil_div(model.attentions, layout.patch) / model.attentions
        outside = whole.total - whole.blocks - whole.other  # attention is all inside the blocks
        return {"linear": (whole.linear - outside) * stage + outside, "attention": whole.attention * stage,
                "other": whole.other}
    count = model.flops_at(ceil_div(model.video_tokens, layout.tokens_split))
    return {"linear": count.linear, "attention": count.attention / layout.tokens_split, "other": count.other}


def evaluate(model: RealModel, layout: Layout, setting: Setting) -> Row:
    shape, forwards = _shape(model), setting.branches // layout.cfg
    per_forward = flops(model, layout)
    step_flops = {k: v * forwards for k, v in per_forward.items()}
    skipped = _skipped_share(model, setting)
    compute = sum(step_flops.values()) * (1 - skipped) / (setting.gpu.bf16_tflops * 1e12 * setting.efficiency)
    if layout.pipefusion:
        patches = setting.pipefusion_patches or layout.patch
        compute *= (patches + layout.patch - 1) / patches  # the pipeline fills and drains each step
        sent = dict(pipefusion_bytes_per_step(shape, stages=layout.patch, cfg=layout.cfg,
                                              branches=setting.branches)["last stage"])
    else:
        sent = bytes_per_step(shape, ulysses=layout.ulysses, ring=layout.ring, cfg=layout.cfg,
                              branches=setting.branches, patch=layout.patch, displaced=layout.patch > 1)
    if layout.shard_weights:
        blocks = sum(model.parameters(e)["blocks"] for e in model.spec.experts[:1])
        sent["fsdp_all_gather"] = forwards * ceil_div(blocks, layout.world) * BF16 * (layout.world - 1)
    spans = {"all_to_all": layout.ulysses, "ring_p2p": layout.ulysses * layout.ring,
             "all_gather_async": layout.tokens_split, "fsdp_all_gather": layout.world,
             "all_gather": layout.world, "p2p": layout.world, "broadcast": layout.world}
    seconds = {kind: n * (1 - skipped) / (_group_gbps(setting, spans.get(kind, layout.world)) * 1e9)
               for kind, n in sent.items()}
    exposed = sum(s for kind, s in seconds.items() if kind not in OVERLAPPED)
    # Ring's K/V passes hide under the attention they feed, nothing else; the other overlapped
    # exchanges (weight gathers, stale K/V) under the whole step's compute.
    attention_s = compute * step_flops["attention"] / max(1.0, sum(step_flops.values()))
    ring_late = max(0.0, seconds.get("ring_p2p", 0.0) - attention_s)
    hidden = sum(s for kind, s in seconds.items() if kind in OVERLAPPED and kind != "ring_p2p")
    step = compute + exposed + ring_late + max(0.0, hidden - compute)
    video = step * setting.steps
    if layout.patch > 1 and not layout.pipefusion:
        # Warm-up steps exchange K/V synchronously: nothing of it hides.
        warm = min(setting.patch_warmup_steps, setting.steps // setting.windows) * setting.windows
        video += warm * seconds.get("all_gather_async", 0.0) - warm * max(0.0, hidden - compute)
    return Row(layout=layout, memory=memory(model, layout, setting), flops=step_flops, sent=sent,
               compute_s=compute, comm_s=step - compute, step_s=step, video_s=video)


def _skipped_share(model: RealModel, setting: Setting) -> float:
    """Share of a step's work a cache skips, on average: on `skip_share` of the steps, the part
    of one forward its kind's `saves` names (caching/planning.py)."""
    if setting.cache == registry.NONE or setting.skip_share <= 0:
        return 0.0
    whole = model.flops()
    work = StepWork(total=whole.total, blocks=whole.blocks, attention=whole.attention, block_count=model.attentions)
    return registry.get(setting.cache).saves.skipped(work, steps=setting.skip_share)


def rank(model: RealModel, setting: Setting) -> tuple[list[Row], list[tuple[Layout, str]]]:
    """Rows best first (those that fit, by projected time; simpler layouts first at equal time),
    each with the reasons it loses to the first; and the layouts the engine refuses."""
    valid, refused = layouts(model, setting)
    usable = setting.gpu.memory_gib * USABLE_MEMORY * 2**30
    rows = [evaluate(model, layout, setting) for layout in valid]
    for row in rows:
        row.fits = row.peak <= usable
    fastest = min((r.video_s for r in rows), default=1.0) or 1.0
    # Within 0.1% of each other, the simpler layout first.
    rows.sort(key=lambda r: (not r.fits, round(r.video_s / fastest, 3), r.layout.offload, r.layout.shard_weights,
                             r.layout.vae_tiling, r.layout.patch > 1, r.layout.ring))
    return explain(rows, setting), refused


def explain(rows: list[Row], setting: Setting) -> list[Row]:
    """Each row's reasons for losing to the first of `rows` (after any filtering)."""
    usable = setting.gpu.memory_gib * USABLE_MEMORY * 2**30
    for row in rows[1:]:
        row.reasons = _why_slower(row, rows[0], setting, usable)
    return rows


def _why_slower(row: Row, best: Row, setting: Setting, usable: float) -> list[str]:
    reasons = []
    if not row.fits:
        reasons.append(f"does not fit: {gib(row.peak):.1f} GiB > {gib(usable):.1f} GiB usable")
    if row.video_s > best.video_s * 1.005:
        extra = row.video_s / best.video_s - 1
        more_comm, more_compute = row.comm_s - best.comm_s, row.compute_s - best.compute_s
        if row.layout.pipefusion:
            reasons.append(f"+{extra:.0%} time: pipeline fill and drain each step")
        elif row.video_s - row.step_s * setting.steps > 0.5 * (row.video_s - best.video_s):
            reasons.append(f"+{extra:.0%} time: K/V exchanged synchronously in the "
                           f"{setting.patch_warmup_steps} warm-up steps")
        elif more_comm >= more_compute:
            link = "IB across nodes" if setting.nodes > 1 else setting.interconnect.upper().replace("NVLINK", "NVLink")
            bound = f"communication-bound on {link}" if row.comm_s > 0.25 * row.step_s else "more communication"
            reasons.append(f"+{extra:.0%} time: {bound} ({row.comm_s:.2f} s exposed of {row.step_s:.2f} s per step)")
        else:
            reasons.append(f"+{extra:.0%} time: more compute per rank ({row.compute_s:.3f} s vs "
                           f"{best.compute_s:.3f} s per step)")
    elif row.fits:
        reasons.append("as fast; " + ("offload, sharding and VAE tiling only cost copies, gathers and seams "
                                      "when memory is short"
                                      if row.layout.offload or row.layout.shard_weights or row.layout.vae_tiling else
                                      "ranked after the simpler layout"))
    if row.layout.patch > 1:
        reasons.append("approximate (stale activations after warm-up)")
    return reasons
