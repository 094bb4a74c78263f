"""The loop's step(state, batch, rng) over a jitted step(state, extra, batch, rng).

`extra` is what a step needs besides the state but never updates (the LDM's frozen first stage and
text encoder, the autoencoder's LPIPS network): it stays a sharded argument of the jitted step
instead of a constant baked into the program. The loop compiles ahead of time
(`step.lower(...).compile()`, for the FLOP count); the compiled step keeps the binding.
"""

from __future__ import annotations

from collections.abc import Callable


class BoundStep:
    """step(state, batch, rng) = jitted(state, extra, select(batch), rng).

    `select` (optional) picks and checks the batch entries the step takes.
    """

    def __init__(self, jitted, extra, select: Callable | None = None):
        self.jitted, self.extra, self.select = jitted, extra, select

    def _batch(self, batch):
        return batch if self.select is None else self.select(batch)

    def __call__(self, state, batch, rng):
        return self.jitted(state, self.extra, self._batch(batch), rng)

    def lower(self, state, batch, rng) -> _BoundLowered:
        return _BoundLowered(self.jitted.lower(state, self.extra, self._batch(batch), rng), self)


class _BoundLowered:
    def __init__(self, lowered, bound: BoundStep):
        self.lowered, self.bound = lowered, bound

    def compile(self) -> BoundStep:
        """The compiled step, bound like the jitted one, with the compiled `cost_analysis`."""
        compiled = self.lowered.compile()
        step = BoundStep(compiled, self.bound.extra, self.bound.select)
        step.cost_analysis = compiled.cost_analysis
        return step
