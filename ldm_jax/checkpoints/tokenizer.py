"""The one rule for which tokenizer a model gets (loaders, orbax folders and the trainer use it)."""

import warnings

from ldm_jax.spec import ModelSpec
from ldm_jax.tokenizers import BertTokenizer, CLIPTokenizer, SDXLTokenizers

CLIP_VOCAB_SIZE = 49408  # the packaged OpenAI CLIP BPE vocabulary


def tokenizer_for_spec(spec: ModelSpec, source=None):
    """The prompt tokenizer of `spec`'s text encoder, from `source` (a folder or hub id: the
    caller's `tokenizer=`, or a diffusers folder's `tokenizer/`), else the packaged CLIP BPE."""
    cond = spec.cond_stage
    if cond is None or not cond.takes_text:
        return None
    if cond.kind == "sdxl":  # a folder holding tokenizer/ and tokenizer_2/ (diffusers layout)
        encoders = cond.config.text_encoders
        length = encoders[0].max_length
        if source is not None:
            return SDXLTokenizers.from_folder(source, len(encoders), max_length=length)
        if all(e.vocab_size == CLIP_VOCAB_SIZE for e in encoders):
            return SDXLTokenizers.from_packaged_vocab(len(encoders), max_length=length)
        return None
    length = cond.config.max_length
    if cond.kind == "ldm_bert":
        if source is None:
            warnings.warn(
                "the LDM BERT text encoder needs the bert-base-uncased vocabulary, which a "
                "CompVis file does not hold: pass tokenizer=<folder or hub id> to attach one",
                stacklevel=3,
            )
            return None
        return BertTokenizer.from_pretrained(source, max_length=length)
    if source is not None:
        return CLIPTokenizer.from_pretrained(source, max_length=length)
    if cond.config.vocab_size == CLIP_VOCAB_SIZE:  # the packaged vocabulary fits
        return CLIPTokenizer.for_cond_stage(cond.kind, max_length=length)
    return None
