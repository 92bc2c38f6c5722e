"""Where SkyReels-V2's sequence is split and gathered: as Wan's (the same attention modules, so
Wan's processors serve), but its blocks take (hidden, text, modulation, rope, causal mask). The
modulation is per token only under diffusion forcing, (B, 6, tokens, D); the causal mask exists
only for checkpoints that denoise frame blocks causally (num_frame_per_block > 1, diffusion
forcing), which this plan does not split: refused there."""

from __future__ import annotations

from unison.engine.models.wan.parallel import WanSelfAttention, WanStageAttention
from unison.parallel.sequence import Split, TokenPlan


def _no_causal_mask(args: list, start: int, end: int) -> None:
    if len(args) > 4 and args[4] is not None:
        raise ValueError("SkyReels-V2's causal frame-block mask (num_frame_per_block > 1) is not split across "
                         "ranks; render it on one rank")


TOKEN_PLAN = TokenPlan(
    blocks=("blocks",), attention="attn1", exact=WanSelfAttention, staged=WanStageAttention,
    splits={2: Split(dim=2, when=lambda modulation: modulation.ndim == 4), 3: Split(dim=1, each=True)},
    reused=(2, 3), adjust=_no_causal_mask)
"""Split at the first block's input, gathered after the last block's output; the text whole."""
