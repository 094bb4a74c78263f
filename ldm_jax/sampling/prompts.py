"""Prompt lists as the pipeline takes them: one string or a list, one entry per prompt."""

from __future__ import annotations


def text_list(texts, name: str) -> list[str]:
    """A string or a non-empty list of strings, as a list; ValueError naming `name` otherwise."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return items


def per_prompt(texts, batch: int, name: str) -> list[str]:
    """One text per prompt: a string serves them all, a list must have one entry each."""
    items = [texts] * batch if isinstance(texts, str) else text_list(texts, name)
    if len(items) != batch:
        raise ValueError(f"{name} has {len(items)} entries but prompt has {batch}")
    return items
