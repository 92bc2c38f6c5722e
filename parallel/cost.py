"""Bytes each rank sends per denoising step, from shapes alone.

This is the analytic count of what the engine's collectives send (tests check it against the
engine's own counters on tiny models; benchmarks/comm_bytes.py tabulates it at real shapes):

- Ulysses, per sequence-parallel attention: all-to-alls of q, k, v and the output, each sending
  (U-1)/U of this rank's shard (s tokens x hidden); joint attention also all-gathers this rank's
  heads of the text output (HunyuanVideo).
- Ring, per attention: R-1 passes of this rank's K and V chunk (U·s tokens x hidden/U).
- Per forward: the final all-gather of this rank's s-token output shard to the sp-1 others.
- Patch parallel (displaced), per attention: an all-gather of this rank's K and V chunk (P-1
  copies of s tokens x hidden each), synchronous in warm-up steps, asynchronous (overlapping
  the next step's compute) after; per forward the same final all-gather as above.
- PipeFusion, per forward: every stage but the last sends the whole sequence's hidden states on
  to the next stage (in patches), and the last stage broadcasts the output to the P-1 others
  (`pipefusion_bytes_per_step`: the busiest rank, which is the last stage for P > 2).
- CFG parallel, per step: one all-gather of this rank's noise prediction.
Text for Wan's cross-attention is replicated and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    """What the communication of one forward depends on."""

    video_tokens: int
    """Tokens after patch embedding (frames x height x width in patches)."""
    heads: int
    head_dim: int
    attentions: int
    """Sequence-parallel (self or joint) attentions per forward: Wan's blocks, HunyuanVideo's
    dual- plus single-stream blocks."""
    latent_elements: int
    """Elements of one noise prediction (CFG parallel exchanges it)."""
    joint_text_tokens: int = 0
    """Text tokens inside joint attention (HunyuanVideo); 0 where text enters by cross-attention."""

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def bytes_per_step(shape: TransformerShape, *, ulysses: int = 1, ring: int = 1, cfg: int = 1, branches: int = 1,
                   patch: int = 1, displaced: bool = False, element_bytes: int = 2) -> dict[str, int]:
    """Bytes one rank sends per step, by collective kind. `branches`: guidance branches per step
    (2 with classifier-free guidance); each rank runs branches / cfg forwards per step.
    `displaced`: a patch-parallel step after warm-up (its K/V exchange is asynchronous)."""
    sp = ulysses * ring * patch
    shard = -(-shape.video_tokens // sp)
    shard_bytes = shard * shape.hidden * element_bytes
    forwards = branches // cfg
    sent = {"all_to_all": 0, "ring_p2p": 0, "all_gather": 0, "all_gather_async": 0}
    if patch > 1:
        sent["all_gather_async" if displaced else "all_gather"] += \
            forwards * shape.attentions * 2 * shard_bytes * (patch - 1)
    if ulysses > 1:
        sent["all_to_all"] = forwards * shape.attentions * 4 * (shard_bytes * (ulysses - 1) // ulysses)
        text_heads = shape.joint_text_tokens * (shape.hidden // ulysses) * element_bytes
        sent["all_gather"] += forwards * shape.attentions * text_heads * (ulysses - 1)
    if ring > 1:
        sent["ring_p2p"] = forwards * shape.attentions * (ring - 1) * 2 * shard_bytes
    if sp > 1:
        sent["all_gather"] += forwards * shard_bytes * (sp - 1)
    if cfg > 1:
        sent["all_gather"] += shape.latent_elements * element_bytes * (cfg - 1)
    return {kind: n for kind, n in sent.items() if n}


def pipefusion_bytes_per_step(shape: TransformerShape, *, stages: int, cfg: int = 1, branches: int = 1,
                              element_bytes: int = 2) -> dict[str, dict[str, int]]:
    """Bytes per step sent by a middle/first stage and by the last stage of a PipeFusion group."""
    forwards = branches // cfg
    hidden = shape.video_tokens * shape.hidden * element_bytes
    return {"stage": {"p2p": forwards * hidden},
            "last stage": {"broadcast": forwards * hidden * (stages - 1)}}


def stale_kv_bytes(shape: TransformerShape, *, mode: str, patch: int, ulysses: int = 1, branches: int = 1,
                   element_bytes: int = 2) -> int:
    """Bytes of stale K/V buffers one rank holds under patch parallelism: every attention layer's
    whole-sequence video K and V per guidance branch it runs. Displaced patches keep every layer
    (its heads only, with Ulysses inside the patch); a PipeFusion stage keeps only its own layers
    (the largest stage by count: ceil(layers / P)). Sequences the degree does not divide add the
    padding to the displaced buffers."""
    per_layer = 2 * shape.video_tokens * shape.heads * shape.head_dim * element_bytes * branches
    if mode == "displaced":
        return per_layer * shape.attentions // ulysses
    return per_layer * -(-shape.attentions // patch)
