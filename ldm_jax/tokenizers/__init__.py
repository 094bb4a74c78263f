"""Prompt tokenizers for the text-conditioned models, usable offline.

- `CLIPTokenizer`: Stable Diffusion 1.x (CLIP, pads with EOS) and 2.x (OpenCLIP, pads with 0), from
  the packaged OpenAI CLIP BPE vocabulary (`data/`, MIT licence) or a diffusers `tokenizer/` folder.
- `SDXLTokenizers`: SDXL's pair (EOS padding, then "!" = 0 padding), one ids array per encoder.
- `BertTokenizer`: the LDM text-to-image model (bert-base-uncased WordPiece), from a local folder or
  a hub id named by the user.
Both return int32 numpy ids [B, 77]; bad or missing vocabulary files raise `TokenizerFileError`.
"""

from ldm_jax.tokenizers.bert import BertTokenizer
from ldm_jax.tokenizers.clip import (
    CLIP_PAD_TOKEN_ID,
    OPENCLIP_PAD_TOKEN_ID,
    PACKAGED_BPE,
    CLIPTokenizer,
)
from ldm_jax.tokenizers.files import TokenizerFileError
from ldm_jax.tokenizers.sdxl import SDXLTokenizers

__all__ = [
    "CLIP_PAD_TOKEN_ID",
    "OPENCLIP_PAD_TOKEN_ID",
    "PACKAGED_BPE",
    "BertTokenizer",
    "CLIPTokenizer",
    "SDXLTokenizers",
    "TokenizerFileError",
]
