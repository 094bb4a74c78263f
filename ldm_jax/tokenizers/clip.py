"""CLIP byte-level BPE tokenizer: Stable Diffusion 1.x (CLIP ViT-L/14), 2.x (OpenCLIP ViT-H/14).

Both use OpenAI CLIP's vocabulary, `bpe_simple_vocab_16e6.txt.gz` (MIT licence; packaged in
`ldm_jax/tokenizers/data` with its notice). As in OpenAI `clip/simple_tokenizer.py`: the 256 byte
symbols, the same with "</w>", the first 48,894 merges, then <|startoftext|> 49406 and
<|endoftext|> 49407 = 49,408 ids. A prompt becomes BOS + tokens + EOS, truncated to 77 with EOS
kept last. The two differ only in padding:
- SD 1.x (CompVis FrozenCLIPEmbedder; diffusers `tokenizer/` config pad_token "<|endoftext|>")
  pads with EOS 49407;
- SD 2.x (CompVis FrozenOpenCLIPEmbedder calls `open_clip.tokenize`) pads with 0. diffusers' SD 2
  folders say pad_token "!" (id 0); transformers then also treats a "!" typed in the prompt as that
  special token (id 0, not the BPE "!</w>" 256). We pad by id ourselves, so prompts tokenize as
  open_clip does, and write "!" into exported folders so diffusers pads as SD 2 was trained.

The text pipeline is transformers' `CLIPTokenizer` (NFC, whitespace runs collapsed, lowercase, the
CLIP split regex, byte-level BPE), built in memory from `vocab=`/`merges=`.
"""

import copy
import functools
import gzip
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ldm_jax.tokenizers import files
from ldm_jax.tokenizers.base import VocabTokenizer, as_text_list
from ldm_jax.tokenizers.files import TokenizerFileError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI CLIP keeps from the file (48,894)
VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
CLIP_PAD_TOKEN_ID = EOS_TOKEN_ID  # SD 1.x
OPENCLIP_PAD_TOKEN_ID = 0  # SD 2.x, open_clip.tokenize
MAX_LENGTH = 77
PACKAGED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# Padding per cond-stage kind (ldm_jax.spec.COND_STAGE_KINDS).
PAD_TOKEN_IDS = {"clip": CLIP_PAD_TOKEN_ID, "openclip": OPENCLIP_PAD_TOKEN_ID}
_FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_FOLDER_NEEDS = "vocab.json and merges.txt (or tokenizer.json) of a CLIP tokenizer"
_BPE_EXPECTED = (
    f"OpenAI CLIP's gzip-compressed BPE file: a '#version' line, then at least {NUM_MERGES} "
    "merges 'a b', one a line"
)

Merges = tuple[tuple[str, str], ...]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table (GPT-2's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, chars), strict=True))


@functools.lru_cache(maxsize=2)
def read_bpe_file(path: str | os.PathLike) -> tuple[tuple[str, ...], Merges]:
    """(tokens in id order, merges) from an OpenAI CLIP `bpe_simple_vocab_16e6.txt.gz`."""
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:  # missing, truncated, not gzip
        raise TokenizerFileError(
            f"cannot read {path} ({type(error).__name__}: {error}); expected {_BPE_EXPECTED}"
        ) from None
    if "#version" not in lines[0] or len(lines) < NUM_MERGES + 1:
        raise TokenizerFileError(
            f"{path} has {len(lines)} lines starting {lines[0][:40]!r}; expected {_BPE_EXPECTED}"
        )
    merges = _parse_merges(enumerate(lines[1 : NUM_MERGES + 1], start=2), str(path))
    base = list(bytes_to_unicode().values())
    tokens = (*base, *(b + "</w>" for b in base), *("".join(m) for m in merges))
    tokens += (BOS_TOKEN, EOS_TOKEN)
    if len(set(tokens)) != VOCAB_SIZE:
        raise TokenizerFileError(f"{path}: its merges repeat tokens; expected {_BPE_EXPECTED}")
    return tokens, merges


def _parse_merges(numbered_lines: Iterable[tuple[int, str]], source: str) -> Merges:
    merges = []
    for number, line in numbered_lines:
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerFileError(
                f"{source} line {number} is {line!r}; expected a merge: two tokens separated by "
                "a space"
            )
        merges.append((pair[0], pair[1]))
    return tuple(merges)


def _read_folder_vocab(folder: Path) -> tuple[dict[str, int], Merges]:
    if (folder / "vocab.json").exists() or (folder / "merges.txt").exists():
        vocab = files.read_json(folder / "vocab.json", "a JSON object mapping token -> id")
        vocab = files.vocab_ids(vocab, str(folder / "vocab.json"))
        path = folder / "merges.txt"
        lines = files.read_text(path, "BPE merges, 'a b' a line").split("\n")
        start = 1 if lines and lines[0].startswith("#version") else 0
        numbered = [(i + 1, line) for i, line in enumerate(lines) if i >= start and line.strip()]
        return vocab, _parse_merges(numbered, str(path))
    model = files.tokenizer_json_model(folder, "BPE")
    if model is None:
        raise TokenizerFileError(f"{folder} holds neither {_FOLDER_NEEDS}")
    source = str(folder / "tokenizer.json")
    vocab = files.vocab_ids(model.get("vocab"), source)
    raw = model.get("merges") or []
    texts = [m if isinstance(m, str) else " ".join(map(str, m)) for m in raw]  # "a b" or [a, b]
    return vocab, _parse_merges(enumerate(texts, start=1), source + " merge")


class CLIPTokenizer(VocabTokenizer):
    """Prompts -> int32 token ids [B, max_length] for a CLIP text encoder.

    Build with `from_packaged_vocab()` (offline), `for_cond_stage("clip" | "openclip")`,
    `from_folder(path)` (a diffusers `tokenizer/` folder), `from_pretrained(path or hub id)` or
    `from_bpe_file(path)`; `pad_token_id` picks EOS padding (SD 1.x) or 0 (SD 2.x, OpenCLIP).
    """

    folder_files = _FOLDER_FILES
    folder_needs = _FOLDER_NEEDS

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token_id: int = CLIP_PAD_TOKEN_ID,
        max_length: int = MAX_LENGTH,
        source: str = "vocabulary",
    ):
        vocab = files.vocab_ids(dict(vocab), source)
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab]
        if missing:
            raise TokenizerFileError(f"{source} lacks the special tokens {missing}")
        if not isinstance(pad_token_id, int) or pad_token_id not in vocab.values():
            raise ValueError(
                f"pad_token_id {pad_token_id!r} is not an id of {source}; use "
                f"{CLIP_PAD_TOKEN_ID} (EOS, SD 1.x) or {OPENCLIP_PAD_TOKEN_ID} (OpenCLIP, SD 2.x)"
            )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (BOS + EOS), got {max_length!r}")
        self._vocab = types.MappingProxyType(vocab)
        self._merges = tuple((str(a), str(b)) for a, b in merges)
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.source = source
        try:
            from transformers import CLIPTokenizer as HFCLIPTokenizer
        except ImportError as error:
            raise ImportError(
                "ldm_jax.tokenizers needs transformers: pip install transformers"
            ) from error
        try:
            # pad_token stays EOS inside transformers: a pad token that is an ordinary symbol ("!")
            # would become special and change how prompts containing it tokenize.
            self._hf = HFCLIPTokenizer(
                vocab=vocab,
                merges=list(self._merges),
                pad_token=EOS_TOKEN,
                model_max_length=max_length,
            )
        except Exception as error:  # tokenizers rejects merges of unknown tokens
            raise TokenizerFileError(f"{source}: not a valid BPE vocabulary ({error})") from None
        self.bos_token_id = self._hf.bos_token_id
        self.eos_token_id = self._hf.eos_token_id

    # --- constructors
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (clip or open_clip packages)."""
        tokens, merges = read_bpe_file(str(path))
        vocab = {token: i for i, token in enumerate(tokens)}
        return cls(vocab, merges, source=str(path), **kwargs)

    @classmethod
    def from_packaged_vocab(cls, **kwargs) -> "CLIPTokenizer":
        """Offline, from the vocabulary shipped with ldm_jax (pads with EOS unless told)."""
        return cls.from_bpe_file(PACKAGED_BPE, **kwargs)

    @classmethod
    def for_cond_stage(cls, kind: str, **kwargs) -> "CLIPTokenizer":
        """The packaged tokenizer padded as `kind` ("clip": SD 1.x, "openclip": SD 2.x) expects."""
        if kind not in PAD_TOKEN_IDS:
            raise ValueError(
                f"no CLIP tokenizer for cond stage {kind!r}; allowed: {list(PAD_TOKEN_IDS)}"
            )
        return cls.from_packaged_vocab(pad_token_id=PAD_TOKEN_IDS[kind], **kwargs)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, pad_token_id: int | None = None, **kwargs):
        """From a diffusers/transformers `tokenizer/` folder; padding from its pad_token unless
        `pad_token_id` is given."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerFileError(
                f"{folder} is not a folder; expected one holding {_FOLDER_NEEDS}"
            )
        vocab, merges = _read_folder_vocab(folder)
        if pad_token_id is None:
            pad = files.special_token(files.read_config(folder), "pad_token", EOS_TOKEN)
            if pad not in vocab:
                raise TokenizerFileError(f"{folder}: pad_token {pad!r} is not in vocab.json")
            pad_token_id = vocab[pad]
        return cls(vocab, merges, pad_token_id=pad_token_id, source=str(folder), **kwargs)

    # --- added tokens (textual inversion)

    def with_added_tokens(self, tokens: Sequence[str]) -> "CLIPTokenizer":
        """A copy whose vocabulary ends with `tokens` (ids vocab_size, vocab_size + 1, ...),
        added as transformers' `add_tokens` (and diffusers' load_textual_inversion) add them:
        matched whole in a prompt, never split by BPE. Padding is unchanged; this tokenizer
        is not modified. ValueError for a token already in the vocabulary or repeated."""
        tokens = [str(t) for t in tokens]
        taken = [t for t in tokens if t in self._vocab or t in self._hf.get_vocab()]
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if taken or repeated:
            raise ValueError(
                f"tokens {taken or repeated} are already in the vocabulary"
                + ("" if taken else " (repeated)")
                + "; choose another token name"
            )
        new = copy.copy(self)
        new._hf = copy.deepcopy(self._hf)
        vocab = dict(self._vocab)
        for token in tokens:  # one at a time, as diffusers adds them
            new._hf.add_tokens(token)
            vocab[token] = new._hf.convert_tokens_to_ids(token)
        expected = list(range(len(self._vocab), len(vocab)))
        if [vocab[t] for t in tokens] != expected:  # the embedding rows are appended in order
            raise ValueError(f"transformers gave the added tokens {tokens} ids not {expected}")
        new._vocab = types.MappingProxyType(vocab)
        new._added = (*self.added_tokens, *tokens)
        return new

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """Tokens added by `with_added_tokens`, in id order."""
        return getattr(self, "_added", ())

    def expand_prompt(self, text: str) -> str:
        """diffusers' `maybe_convert_prompt`: an added token `tok` whose vectors continue as
        `tok_1`, `tok_2`, ... becomes "tok tok_1 tok_2 ..." (a plain string replace of every
        occurrence, as diffusers does)."""
        added = set(self.added_tokens)
        if not added:
            return text
        for token in sorted(set(self._hf.tokenize(text)) & added):
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            text = text.replace(token, replacement)
        return text

    # --- use

    @property
    def merges(self) -> Merges:
        return self._merges

    def __call__(self, texts: str | Sequence[str], *, return_attention_mask: bool = False):
        """ids [B, max_length] int32 (and the attention mask, 1 on BOS..EOS, if asked)."""
        texts = [self.expand_prompt(t) for t in as_text_list(texts)]
        encoded = (
            self._hf(texts, truncation=True, max_length=self.max_length)["input_ids"]
            if texts
            else []
        )
        return _pad(encoded, self.max_length, self.pad_token_id, return_attention_mask)

    def write_folder(self, path: str | os.PathLike) -> None:
        """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as in the
        `tokenizer/` folder of a diffusers Stable Diffusion pipeline (transformers' CLIPTokenizer
        .from_pretrained loads it)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        files.refuse_existing(folder, _FOLDER_FILES)
        ids_to_tokens = {i: t for t, i in self._vocab.items()}
        specials = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": ids_to_tokens[self.pad_token_id],
            "unk_token": EOS_TOKEN,
        }
        files.write_json(folder / "vocab.json", dict(self._vocab))
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        config = {
            **specials,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": self.max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        files.write_json(folder / "tokenizer_config.json", config)
        files.write_json(folder / "special_tokens_map.json", specials)

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, pad_token_id={self.pad_token_id}, "
            f"max_length={self.max_length}, source={self.source!r})"
        )


def _pad(encoded: list[list[int]], length: int, pad_id: int, with_mask: bool):
    """Right-pad token lists to `length` with `pad_id`; the mask marks the real tokens."""
    ids = np.full((len(encoded), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(encoded), length), dtype=np.int32)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return (ids, mask) if with_mask else ids
