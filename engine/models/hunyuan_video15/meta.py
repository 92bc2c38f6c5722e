"""HunyuanVideo 1.5's transformer on the meta device, for `unison plan`.

Its forward cannot run there as it is: it decides text-to-video from the image embeddings' values
(`torch.all(image_embeds == 0)`) and moves the valid text tokens of its three streams ahead of the
padding by boolean masks, both of which read data. The stand-in below runs the same modules on the
same shapes in the same order with every text token valid: the image, glyph and prompt streams
are joined in the order the forward puts valid tokens. FLOPs and activation bytes are what the
forward spends with its padded text (padding costs as much as text in every attention and MLP);
on real tensors with all-valid masks it returns what the forward returns (a test holds it to
that, bit for bit, on the tiny model)."""

from __future__ import annotations

import torch

from unison.engine.models.hunyuan_video15.hooks import GLYPH_TOKENS, VISION_TOKENS
from unison.engine.models.spec import MetaTransformer


def inputs(config: dict, x: torch.Tensor, text_tokens: int, dtype: torch.dtype) -> dict:
    """The forward's arguments: the Qwen prompt padded to `text_tokens`, the glyph text padded to
    the pipeline's 256 ByT5 tokens and SigLIP's 729 image tokens, each with its mask."""

    def empty(tokens: int, width: int | None = None) -> torch.Tensor:
        shape = (1, tokens) if width is None else (1, tokens, width)
        return torch.empty(shape, device=x.device, dtype=dtype)

    return dict(hidden_states=x, timestep=torch.empty(1, device=x.device, dtype=dtype),  # as the latents
                encoder_hidden_states=empty(text_tokens, config.get("text_embed_dim", 3584)),
                encoder_attention_mask=empty(text_tokens),
                encoder_hidden_states_2=empty(GLYPH_TOKENS, config.get("text_embed_2_dim", 1472)),
                encoder_attention_mask_2=empty(GLYPH_TOKENS),
                image_embeds=empty(VISION_TOKENS, config.get("image_embed_dim", 1152)), return_dict=False)


def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
            encoder_hidden_states_2, encoder_attention_mask_2, image_embeds, return_dict=False):
    """HunyuanVideo15Transformer3DModel.forward with every text token valid (bound to the module
    in place of its forward)."""
    batch, _, frames, height, width = hidden_states.shape
    pt, p = self.config.patch_size_t, self.config.patch_size
    rope = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=None)
    hidden = self.x_embedder(hidden_states)

    def typed(stream: torch.Tensor, kind: int) -> torch.Tensor:
        return stream + self.cond_type_embed(torch.full_like(stream[:, :, 0], kind, dtype=torch.long))

    text = typed(self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask), 0)
    glyph = typed(self.context_embedder_2(encoder_hidden_states_2), 1)
    image = typed(self.image_embedder(image_embeds), 2)
    joint = torch.cat([image, glyph, text], dim=1)
    mask = torch.ones(joint.shape[:2], dtype=torch.bool, device=joint.device)
    for block in self.transformer_blocks:
        hidden, joint = block(hidden, joint, temb, mask, rope)
    hidden = self.proj_out(self.norm_out(hidden, temb))
    hidden = hidden.reshape(batch, frames // pt, height // p, width // p, -1, pt, p, p)
    return (hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3),)


META = MetaTransformer(default_heads=16, inputs=inputs, forward=forward,
                       joint_text=lambda text_tokens: text_tokens + GLYPH_TOKENS + VISION_TOKENS)
"""diffusers' class defaults: 16 heads, 54 blocks; the text stream adds the glyph and image tokens."""
