"""Tiny textual-inversion files in the three layouts: A1111 `.pt`, A1111/civitai `.safetensors`
(emb_params) and diffusers `learned_embeds` ({token: vectors})."""

from pathlib import Path

import numpy as np
import safetensors.torch
import torch


def random_embedding(vectors: int, width: int, seed: int = 0) -> np.ndarray:
    """float32 [vectors, width], scaled like CLIP token embeddings (std ~0.02 ... 0.3)."""
    return (0.3 * np.random.default_rng(seed).standard_normal((vectors, width))).astype(np.float32)


def write_a1111_pt(path: Path, embedding: np.ndarray, name: str) -> Path:
    """A1111's `.pt`: string_to_param {"*": [n, D]} with its name and bookkeeping entries."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.from_numpy(embedding.copy())},
            "name": name,
            "step": 1000,
            "sd_checkpoint": "0123abcd",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    return path


def write_a1111_safetensors(path: Path, embedding: np.ndarray) -> Path:
    """A1111 / civitai `.safetensors`: one `emb_params` [n, D] (the token is the file's name)."""
    safetensors.torch.save_file({"emb_params": torch.from_numpy(embedding.copy())}, str(path))
    return path


def write_diffusers(path: Path, embedding: np.ndarray, token: str) -> Path:
    """diffusers' `learned_embeds.bin` / `.safetensors`: {token: [D] or [n, D]}."""
    tensors = {token: torch.from_numpy(embedding.copy())}
    if Path(path).suffix == ".safetensors":
        safetensors.torch.save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def write_sdxl(path: Path, clip_l: np.ndarray, clip_g: np.ndarray) -> Path:
    """An SDXL embedding (A1111 / civitai): `clip_l` [n, 768] and `clip_g` [n, 1280] vectors."""
    tensors = {"clip_l": clip_l, "clip_g": clip_g}
    safetensors.torch.save_file({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)
    return path
