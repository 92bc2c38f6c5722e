"""Pieces for tiny random-weight presets: an offline tokenizer and seeded construction.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained in-process on a
small fixed corpus, so every prompt tokenizes to distinct ids (unlike a word-level vocabulary
where unknown words collapse into one id) and the result is the same on every machine.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB = 512
"""Vocabulary size of every tiny text encoder; the tokenizer never exceeds it."""

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3

_CORPUS = (
    "Describe the video by detailing the following aspects: the main content and theme of the video, "
    "the color, shape, size, texture, quantity, text, and spatial relationships of the objects, "
    "actions, events, behaviors, temporal relationships, physical movement changes of the objects, "
    "background environment, light, style and atmosphere, camera angles, movements, and transitions. "
    "system user assistant start_header_id end_header_id eot_id "
    "A red panda eating bamboo in a quiet forest, soft morning light. A cat walks on the grass. "
    "A dog runs along the beach at sunset while waves roll in. A city street at night with neon "
    "signs and rain. An astronaut rides a horse on the moon. Close-up of a flower opening, time-lapse. "
    "Bright, overexposed, static, blurred details, subtitles, worst quality, low quality, ugly, "
    "deformed, extra fingers, poorly drawn hands, poorly drawn faces, still picture, messy background."
)


def tiny_tokenizer(*, bos: bool, eos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ids pad=0, eos=1, unk=2, bos=3.

    `bos`/`eos` choose the special tokens added around each text: T5 appends eos only,
    Llama prepends bos only, CLIP does both.
    """
    return _train([_CORPUS], special=[], bos=bos, eos=eos)


LLAVA_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")
"""The Llama 3 chat markers and LLaVA's image placeholder that HunyuanVideo I2V's prompt template
holds, as single tokens (ids 4 to 7: IMAGE_ID is the last)."""
IMAGE_ID = 7


def tiny_llava_tokenizer() -> PreTrainedTokenizerFast:
    """tiny_tokenizer(bos=True, eos=False) with LLAVA_SPECIAL, trained on the corpus and twice on
    diffusers' HunyuanVideo I2V prompt template (less the word "detailing"), so that the template
    tokenizes the way the real Llama 3 tokenizer does where the pipeline counts on it: the image
    placeholder at position 5 and 103 tokens before the prompt (its crop_start; a test checks both)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", "").replace("detailing", "")
    return _train([_CORPUS, template, template], special=list(LLAVA_SPECIAL), bos=True, eos=False)


def _train(corpus: list[str], *, special: list[str], bos: bool, eos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[PAD, EOS, UNK, BOS, *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    single = " ".join(([BOS] if bos else []) + ["$A"] + ([EOS] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS
    )
