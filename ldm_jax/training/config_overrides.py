"""Checks `--config.a.b=value` overrides against the config before ml_collections applies them.

ml_collections reports an unknown key as a multi-line traceback from inside absl's flag parser;
this finds the first unknown key and says, in one line, which keys exist at that level and which
full keys are close.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path


class OverrideError(ValueError):
    """An override names a key the config does not have (or the config file is unusable)."""


def config_path_and_arg(argv: list[str]) -> tuple[str | None, str | None]:
    """(file, arg) of `--config path[:arg]` / `--config=path[:arg]` in argv."""
    for i, token in enumerate(argv):
        value = None
        if token.startswith("--config="):
            value = token.split("=", 1)[1]
        elif token == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            path, _, arg = value.partition(":")
            return path, arg or None
    return None, None


def override_keys(argv: list[str]) -> list[str]:
    """Dotted keys of every `--config.<key>[=value]` (and `--noconfig.<key>` boolean) token."""
    keys = []
    for token in argv:
        for prefix in ("--config.", "--noconfig."):
            if token.startswith(prefix):
                keys.append(token[len(prefix):].split("=", 1)[0])
    return keys


def load_config(path: str, arg: str | None = None):
    """get_config(arg) of a config file (as ml_collections would load it)."""
    file = Path(path)
    if not file.is_file():
        raise OverrideError(f"config file {path} does not exist (pass --config configs/<name>.py)")
    if not file.name.endswith(".py"):
        raise OverrideError(f"config file {path} is not a Python file (pass --config "
                            "configs/<name>.py[:arg])")
    spec = importlib.util.spec_from_file_location(f"_ldm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - a user's file: any failure is one line
        raise OverrideError(f"config file {path} failed to load: {_one_line(error)}") from error
    if not hasattr(module, "get_config"):
        raise OverrideError(f"config file {path} has no get_config() function")
    try:  # e.g. an unknown `:arg` (configs/default.py:foo)
        return module.get_config(arg) if arg is not None else module.get_config()
    except Exception as error:  # noqa: BLE001
        raise OverrideError(f"config file {path}: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def config_docstring(path: str) -> str:
    """The config file's module docstring, read without running the file (for --help)."""
    import ast  # noqa: PLC0415

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as error:
        return f"(config file {path} cannot be read: {_one_line(error)})"
    return ast.get_docstring(tree) or f"(config file {path} has no docstring)"


def all_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for name in config.keys():
        full = f"{prefix}{name}"
        keys.append(full)
        value = config[name]
        if hasattr(value, "keys") and hasattr(value, "items"):
            keys.extend(all_keys(value, full + "."))
    return keys


def check_override_keys(config, keys: list[str]) -> None:
    """Raise OverrideError for the first key that is not in `config`."""
    for key in keys:
        node, walked = config, []
        for part in key.split("."):
            if not (hasattr(node, "keys") and part in node.keys()):
                here = ".".join(walked)
                if not hasattr(node, "keys"):
                    raise OverrideError(
                        f"unknown config key {key!r}: {here!r} is a value, not a group"
                    )
                allowed = ", ".join(sorted(node.keys()))
                close = difflib.get_close_matches(key, all_keys(config), n=3, cutoff=0.75)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                where = f"under {here!r}" if here else "at the top level"
                raise OverrideError(
                    f"unknown config key {key!r}{hint} (keys {where}: {allowed})"
                )
            node = node[part]
            walked.append(part)
