"""SDXL's prompt tokenizers: one CLIP BPE tokenizer per text encoder, used together.

Both use the same OpenAI CLIP vocabulary and differ in padding, as diffusers' SDXL folders say:
`tokenizer/` (CLIP ViT-L) pads with EOS, `tokenizer_2/` (OpenCLIP bigG, SGM's open_clip.tokenize)
with "!" = id 0. The refiner has only the second. Pooling reads the EOS position by argmax (legacy
eos id 2 in both configs), so either padding pools right.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from ldm_jax.tokenizers.clip import CLIP_PAD_TOKEN_ID, OPENCLIP_PAD_TOKEN_ID, CLIPTokenizer
from ldm_jax.tokenizers.files import TokenizerFileError

# diffusers' folder names; a refiner (one encoder) has only the last
SDXL_TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


def sdxl_tokenizer_folders(num_encoders: int) -> tuple[str, ...]:
    """The diffusers folder name of each encoder's tokenizer (1 or 2 encoders)."""
    if num_encoders not in (1, 2):
        raise ValueError(f"SDXL has 1 or 2 text encoders; got {num_encoders}")
    return SDXL_TOKENIZER_FOLDERS[-num_encoders:]


class SDXLTokenizers:
    """Prompts -> a tuple of int32 ids [B, max_length], one per text encoder (the input of
    `ldm_jax.latent_diffusion.SDXLInputs.token_ids`)."""

    def __init__(self, tokenizers: Sequence[CLIPTokenizer]):
        tokenizers = tuple(tokenizers)
        sdxl_tokenizer_folders(len(tokenizers))  # 1 or 2
        self.tokenizers = tokenizers

    @classmethod
    def from_packaged_vocab(cls, num_encoders: int = 2, *, max_length: int = 77):
        """Offline: EOS padding for CLIP ViT-L, 0 for the last (OpenCLIP bigG) encoder."""
        pads = (CLIP_PAD_TOKEN_ID, OPENCLIP_PAD_TOKEN_ID)[-num_encoders:]
        sdxl_tokenizer_folders(num_encoders)
        return cls(
            CLIPTokenizer.from_packaged_vocab(pad_token_id=pad, max_length=max_length)
            for pad in pads
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike, num_encoders: int = 2, *, max_length: int = 77):
        """From a folder holding `tokenizer/` and `tokenizer_2/` (a diffusers SDXL pipeline
        folder, or what `write_folder` wrote); padding from each folder's pad_token."""
        folder = Path(path)
        names = sdxl_tokenizer_folders(num_encoders)
        missing = [n for n in names if not (folder / n).is_dir()]
        if missing:
            raise TokenizerFileError(
                f"{folder} lacks the SDXL tokenizer folders {missing}; expected {list(names)}"
            )
        return cls(CLIPTokenizer.from_folder(folder / n, max_length=max_length) for n in names)

    def __call__(self, texts) -> tuple:
        return tuple(tokenizer(texts) for tokenizer in self.tokenizers)

    def __len__(self) -> int:
        return len(self.tokenizers)

    def write_folder(self, path: str | os.PathLike) -> None:
        """One diffusers tokenizer folder per encoder (`tokenizer/`, `tokenizer_2/`) in `path`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name, tokenizer in zip(
            sdxl_tokenizer_folders(len(self.tokenizers)), self.tokenizers, strict=True
        ):
            tokenizer.write_folder(folder / name)

    def __repr__(self) -> str:
        return f"SDXLTokenizers({list(self.tokenizers)!r})"
