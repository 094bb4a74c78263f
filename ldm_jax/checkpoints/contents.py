"""What every checkpoint reader returns and every writer takes: a spec, its parameters, a tokenizer.

Format modules (compvis/, diffusers/, orbax.py) build and consume this plain record;
`LatentDiffusionCheckpoint` (facade.py) is the same record with the load/save entry points.
"""

import dataclasses
from pathlib import Path
from typing import Any

from ldm_jax.spec import ModelSpec


@dataclasses.dataclass
class CheckpointContents:
    spec: ModelSpec
    params: dict[str, Any]  # {"unet", "first_stage", "cond_stage"}: plain pytrees; absent = no net
    tokenizer: Any = None  # a tokenizer object from ldm_jax.tokenizers, when the model takes text
    # the local file or folder it was read from (None otherwise): saving never replaces it or a
    # folder around it
    source: Path | None = dataclasses.field(default=None, compare=False)
