"""Reading tokenizer files with one clear error per problem; hub downloads only when asked.

Folders follow the Hugging Face layout (a diffusers pipeline's `tokenizer/` folder): `vocab.json` +
`merges.txt` (BPE) or `vocab.txt` (WordPiece), `tokenizer_config.json`, `special_tokens_map.json`,
or only `tokenizer.json` (what transformers >= 5 `save_pretrained` writes).
"""

import json
import os
from pathlib import Path
from typing import Any


class TokenizerFileError(ValueError):
    """A vocabulary file is missing, unreadable or not in the expected format."""


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of `path`; `expected` says what the file should be, for the error."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(f"{path} is missing; expected {expected}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"cannot read {path} ({error}); expected {expected}") from None


def read_json(path: Path, expected: str) -> Any:
    text = read_text(path, expected)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerFileError(
            f"{path} is not valid JSON ({error}); expected {expected}"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json merged over special_tokens_map.json; {} where neither exists."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            data = read_json(path, "a JSON object of tokenizer settings")
            if not isinstance(data, dict):
                raise TokenizerFileError(f"{path} holds {type(data).__name__}; expected an object")
            config.update(data)
    return config


def special_token(config: dict[str, Any], name: str, default: str) -> str:
    """A special token's text; transformers writes either a string or an AddedToken dict."""
    value = config.get(name, default)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerFileError(
            f"tokenizer setting {name!r} is {value!r}; expected a token string"
        )
    return value


def tokenizer_json_model(folder: Path, model_type: str) -> dict[str, Any] | None:
    """The "model" section of `folder`/tokenizer.json, None when the file is absent."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    data = read_json(path, f"a tokenizers serialisation with a {model_type} model")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != model_type:
        found = model.get("type") if isinstance(model, dict) else None
        raise TokenizerFileError(f"{path} holds a {found} model; expected a {model_type} model")
    return model


def vocab_ids(vocab: Any, source: str) -> dict[str, int]:
    """Check a token -> id mapping: string keys, distinct non-negative integer ids."""
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{source}: expected a non-empty object mapping token -> id")
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise TokenizerFileError(
            f"{source}: ids must be non-negative integers; bad tokens: {bad[:5]}"
        )
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerFileError(f"{source}: several tokens share an id")
    return dict(vocab)


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str,
    patterns: tuple[str, ...],
    needs: str,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder as is; anything else is taken as a hub id and fetched with huggingface_hub
    (only `patterns` inside `subfolder`). Offline, the error says to pass a local folder."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists():
        raise TokenizerFileError(f"{path} is a file; expected a folder holding {needs}")
    if path.is_absolute() or str(name_or_path).startswith((".", "~")):  # a path, not a hub id
        raise TokenizerFileError(f"{path} does not exist; expected a folder holding {needs}")
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        import huggingface_hub

        root = huggingface_hub.snapshot_download(
            str(name_or_path),
            allow_patterns=[prefix + p for p in patterns],
            cache_dir=cache_dir,
        )
    except Exception as error:  # offline, unknown repo, bad id, huggingface_hub not installed
        raise TokenizerFileError(
            f"{str(name_or_path)!r} is not a local folder, and fetching it from the Hugging Face "
            f"hub failed ({type(error).__name__}: {error}). Offline, pass a local folder holding "
            f"{needs}."
        ) from None
    return Path(root) / subfolder if subfolder else Path(root)


def write_json(path: Path, data: Any) -> None:
    # The formatting transformers uses, so written folders diff cleanly against hub folders.
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def refuse_existing(folder: Path, names: tuple[str, ...]) -> None:
    """write_folder never overwrites: exports write into a fresh (temporary) folder."""
    present = [name for name in names if (folder / name).exists()]
    if present:
        raise FileExistsError(f"{folder} already holds {present}; write into a new folder")
