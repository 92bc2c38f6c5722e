"""Where SkyReels-V2's sequence is split and gathered: as Wan's (the same attention modules, so
Wan's processors serve), but its blocks take (hidden, text, modulation, rope, causal mask). The
modulation is per token only under diffusion forcing, (B, 6, tokens, D); the causal mask exists
only when frame blocks are denoised causally (num_frame_per_block > 1, diffusion forcing). It is
handed whole to every block; Wan's processor reads its block length once per forward and runs
the block-causal attention under Ulysses and Ring (parallel/attention.py); patches do not take it
(the plan refuses them: engine/models/skyreels_v2/forcing.py)."""

from __future__ import annotations

from unison.engine.models.wan.parallel import WanSelfAttention, WanStageAttention
from unison.parallel.sequence import Split, TokenPlan

TOKEN_PLAN = TokenPlan(
    blocks=("blocks",), attention="attn1", exact=WanSelfAttention, staged=WanStageAttention,
    splits={2: Split(dim=2, when=lambda modulation: modulation.ndim == 4), 3: Split(dim=1, each=True)},
    reused=(2, 3))
"""Split at the first block's input, gathered after the last block's output; the text whole."""
