"""Where HunyuanVideo 1.5's sequence is split and gathered: its blocks take (hidden, text, temb,
mask, rope) and return (hidden, text), with (tokens, dim) rotary tables and HunyuanVideo's
dual-stream joint attention, so HunyuanVideo's processors serve. The text stream is the image,
glyph and prompt tokens with the valid ones first (the transformer reorders them); its real length
is the prompt and glyph masks' sums and the image tokens where a picture was given (the
transformer masks all-zero image embeddings out), each read once per input tensor before the
blocks (no host read in them)."""

from __future__ import annotations

import torch

from unison.engine.models.hunyuan_video.parallel import (HunyuanJointAttention, HunyuanStageAttention,
                                                         TextLengths)
from unison.parallel.sequence import Split, TokenPlan


class ImageTokens(TextLengths):
    """Valid image tokens of a forward's `image_embeds`: all of them, or none where every value is
    zero (text-to-video), as the transformer decides."""

    def count(self, image_embeds: torch.Tensor) -> list[int]:
        none = bool(torch.all(image_embeds == 0))  # the transformer's own test, over the whole batch
        return [0 if none else image_embeds.shape[1]] * image_embeds.shape[0]


def _record_text_length(transformer, cache: dict):
    """A pre-hook on the transformer: the forward's valid text tokens (prompt, glyph and image)."""
    prompt, glyph, image = TextLengths(), TextLengths(), ImageTokens()

    def hook(module, args, kwargs):
        cache["text_valid"] = (prompt(kwargs["encoder_attention_mask"]) + glyph(kwargs["encoder_attention_mask_2"])
                               + image(kwargs["image_embeds"]))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


TOKEN_PLAN = TokenPlan(
    blocks=("transformer_blocks",), attention="attn", exact=HunyuanJointAttention, staged=HunyuanStageAttention,
    splits={4: Split(dim=0, each=True)}, reused=(4,), carried=(1,), watch=_record_text_length)
