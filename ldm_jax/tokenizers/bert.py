"""WordPiece tokenizer of the LDM text-to-image model (CompVis `BERTTokenizer`).

CompVis latent-diffusion ldm/modules/encoders/modules.py, BERTTokenizer: transformers'
`BertTokenizerFast.from_pretrained("bert-base-uncased")` called with truncation=True,
max_length=77, padding="max_length": [CLS] ... [SEP], then [PAD] (id 0 in bert-base-uncased,
30,522 ids). diffusers' `CompVis/ldm-text2im-large-256` ships that vocabulary in `tokenizer/`.

The vocabulary is not packaged: pass a folder holding vocab.txt (or tokenizer.json), or name a hub
id explicitly (`from_pretrained("bert-base-uncased")`, needs the network or the hub cache).
"""

import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ldm_jax.tokenizers import files
from ldm_jax.tokenizers.base import VocabTokenizer, as_text_list
from ldm_jax.tokenizers.files import TokenizerFileError

MAX_LENGTH = 77
# transformers' BertTokenizer argument -> default token; all must be in the vocabulary, otherwise
# transformers would silently append them as new ids.
SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
_FOLDER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_FOLDER_NEEDS = (
    "vocab.txt (or tokenizer.json) of a BERT WordPiece tokenizer, e.g. bert-base-uncased"
)


def read_vocab_txt(path: Path) -> dict[str, int]:
    """vocab.txt: one WordPiece token a line, the line number is the id."""
    lines = files.read_text(path, "a WordPiece vocabulary, one token a line").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    tokens = [line.rstrip("\r") for line in lines]
    if not tokens:
        raise TokenizerFileError(f"{path} is empty; expected a WordPiece vocabulary")
    seen: set[str] = set()
    repeated = [t for t in tokens if t in seen or seen.add(t)]
    if repeated:
        raise TokenizerFileError(f"{path} repeats tokens {repeated[:5]}; each line must be unique")
    return {token: i for i, token in enumerate(tokens)}


def _read_folder_vocab(folder: Path) -> tuple[dict[str, int], str]:
    if (folder / "vocab.txt").exists():
        return read_vocab_txt(folder / "vocab.txt"), str(folder / "vocab.txt")
    model = files.tokenizer_json_model(folder, "WordPiece")
    if model is None:
        raise TokenizerFileError(f"{folder} holds no {_FOLDER_NEEDS}")
    source = str(folder / "tokenizer.json")
    return files.vocab_ids(model.get("vocab"), source), source


class BertTokenizer(VocabTokenizer):
    """Prompts -> int32 token ids [B, max_length], as CompVis BERTTokenizer produces them.

    Build with `from_folder(path)` or `from_pretrained(path or hub id)`.
    """

    folder_files = _FOLDER_FILES
    folder_needs = _FOLDER_NEEDS

    def __init__(
        self,
        vocab: Mapping[str, int],
        *,
        max_length: int = MAX_LENGTH,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        special_tokens: Mapping[str, str] | None = None,
        source: str = "vocabulary",
    ):
        vocab = files.vocab_ids(dict(vocab), source)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerFileError(f"{source}: ids must be 0..{len(vocab) - 1} without gaps")
        specials = {**SPECIAL_TOKENS, **(special_tokens or {})}
        missing = {name: t for name, t in specials.items() if t not in vocab}
        if missing:
            raise TokenizerFileError(f"{source} lacks the special tokens {missing}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an integer >= 2 ([CLS] + [SEP]), got {max_length!r}"
            )
        self._vocab = types.MappingProxyType(vocab)
        self.special_tokens = types.MappingProxyType(specials)
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.source = source
        try:
            from transformers import BertTokenizer as HFBertTokenizer
        except ImportError as error:
            raise ImportError(
                "ldm_jax.tokenizers needs transformers: pip install transformers"
            ) from error
        self._hf = HFBertTokenizer(
            vocab=vocab,
            do_lower_case=do_lower_case,
            strip_accents=strip_accents,
            model_max_length=max_length,
            **specials,
        )
        self.pad_token_id = vocab[specials["pad_token"]]
        self.cls_token_id = vocab[specials["cls_token"]]
        self.sep_token_id = vocab[specials["sep_token"]]

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs) -> "BertTokenizer":
        """From a folder holding vocab.txt (a bert-base-uncased snapshot, or the `tokenizer/`
        folder of a diffusers LDM text-to-image pipeline); casing and special tokens from its
        tokenizer_config.json where present."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerFileError(
                f"{folder} is not a folder; expected one holding {_FOLDER_NEEDS}"
            )
        vocab, source = _read_folder_vocab(folder)
        config = files.read_config(folder)
        settings = {
            "do_lower_case": bool(config.get("do_lower_case", True)),
            "strip_accents": config.get("strip_accents"),
            "special_tokens": {
                name: files.special_token(config, name, default)
                for name, default in SPECIAL_TOKENS.items()
            },
        }
        return cls(vocab, source=source, **{**settings, **kwargs})

    def __call__(self, texts: str | Sequence[str], *, return_attention_mask: bool = False):
        """ids [B, max_length] int32 (and the attention mask, 1 on [CLS]..[SEP], if asked)."""
        texts = as_text_list(texts)
        if not texts:
            empty = np.zeros((0, self.max_length), np.int32)
            return (empty, empty.copy()) if return_attention_mask else empty
        encoded = self._hf(texts, truncation=True, max_length=self.max_length, padding="max_length")
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        if return_attention_mask:
            return ids, np.asarray(encoded["attention_mask"], dtype=np.int32)
        return ids

    def write_folder(self, path: str | os.PathLike) -> None:
        """vocab.txt, tokenizer_config.json, special_tokens_map.json (transformers'
        BertTokenizer.from_pretrained and `from_folder` load it)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        files.refuse_existing(folder, _FOLDER_FILES)
        tokens = sorted(self._vocab, key=self._vocab.__getitem__)
        (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        config = {
            **self.special_tokens,
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "model_max_length": self.max_length,
            "tokenizer_class": "BertTokenizer",
        }
        files.write_json(folder / "tokenizer_config.json", config)
        files.write_json(folder / "special_tokens_map.json", dict(self.special_tokens))

    def __repr__(self) -> str:
        return (
            f"BertTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"source={self.source!r})"
        )
