"""What the CLIP and BERT tokenizers share: a vocabulary, the transformers tokenizer underneath,
folder/hub resolution and prompt-list checking."""

import os
from collections.abc import Mapping, Sequence

from ldm_jax.tokenizers import files


class VocabTokenizer:
    """Base of the prompt tokenizers; subclasses set `folder_files`/`folder_needs`, `_vocab`, `_hf`
    and implement `from_folder`."""

    folder_files: tuple[str, ...] = ()
    folder_needs: str = ""

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs):
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, subfolder: str = "", cache_dir=None, **kwargs
    ):
        """A local folder, or a hub id (e.g. a pipeline repo with subfolder="tokenizer"; or
        "bert-base-uncased") fetched through huggingface_hub only when named; offline, one error
        saying to pass a local folder."""
        folder = files.resolve_folder(
            name_or_path,
            subfolder=subfolder,
            patterns=(*cls.folder_files, "tokenizer.json"),
            needs=cls.folder_needs,
            cache_dir=cache_dir,
        )
        return cls.from_folder(folder, **kwargs)

    @property
    def vocab(self) -> Mapping[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def hf_tokenizer(self):
        """The transformers tokenizer underneath."""
        return self._hf


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """One prompt or a sequence of prompts, as a list; TypeError for anything else."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        kinds = sorted({type(t).__name__ for t in texts})
        raise TypeError(f"expected a string or a sequence of strings, got items of {kinds}")
    return texts
