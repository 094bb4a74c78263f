"""A tqdm progress bar driven by the sampler's per-step host callback.

```python
from ldm_jax.sampling.pipeline import sampler_iterations
from ldm_jax.sampling.progress import StepProgress

with StepProgress(sampler_iterations("ddim", 50)) as progress:
    images = pipe("a photo of a cat", num_inference_steps=50, callback_on_step_end=progress)
```
"""

from __future__ import annotations

import sys


class StepProgress:
    """A ``callback_on_step_end(step, timestep, latents)`` (or a sampler's ``callback(i, x)``)
    that moves a tqdm bar to step + 1 (robust to repeated or late calls)."""

    def __init__(self, total: int, *, desc: str = "sampling", file=None, disable: bool = False):
        from tqdm.auto import tqdm  # noqa: PLC0415 - notebook widget when available

        self.total = int(total)
        self.steps: list[int] = []  # every reported iteration index, in arrival order
        self.bar = tqdm(
            total=self.total,
            desc=desc,
            unit="step",
            file=sys.stderr if file is None else file,
            disable=disable,
        )

    def __call__(self, i, timestep=None, latents=None) -> None:
        i = int(i)
        if not self.steps:  # start the clock at the first step, not before compilation
            self.bar.reset(total=self.total)
        self.steps.append(i)
        if i + 1 > self.bar.n:
            self.bar.update(i + 1 - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
