"""Every error the checkpoint readers and writers raise, in one place.

All are ValueErrors (a bad file or a bad request, never a bug), so callers and the CLIs can catch
one family; the destination errors come from `ldm_jax.atomic` (DestinationExistsError and
DestinationNotReplaceableError are FileExistsErrors; DestinationOverlapsSourceError a ValueError).
"""

from ldm_jax.atomic import (
    DestinationExistsError,
    DestinationNotReplaceableError,
    DestinationOverlapsSourceError,
)

__all__ = [
    "ArchitectureError",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "DestinationExistsError",
    "DestinationNotReplaceableError",
    "DestinationOverlapsSourceError",
    "OrbaxCheckpointError",
    "UnsupportedExportError",
    "UnsupportedLoRAError",
]


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or of an unknown format."""


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the architecture it is being loaded into."""


class ArchitectureError(ValueError):
    """The checkpoint's architecture cannot be settled (ambiguous or unsupported)."""


class OrbaxCheckpointError(ValueError):
    """A folder that is not a readable ldm_jax orbax checkpoint."""


class UnsupportedExportError(ValueError):
    """The checkpoint has no equivalent in the requested format."""


class UnsupportedLoRAError(ValueError):
    """A LoRA file that does not fit the model: a key naming no layer of it (another
    architecture, an unsupported adapter type), wrong shapes, or non-finite values."""
