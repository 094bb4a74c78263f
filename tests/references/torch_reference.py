"""Helpers for comparing with PyTorch reference models: layout moves and random weights."""

import numpy as np
import torch


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A torch NCHW tensor as a numpy NHWC array."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(x: np.ndarray) -> torch.Tensor:
    """A numpy NHWC array as a torch NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights of a realistic scale for every tensor, norms and biases included.

    Default inits leave norms at (1, 0) and some layers at zero, which would hide mapping errors.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "embed" in name:
                p.copy_(noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
