"""Importing ldm_jax does no device work: no module creates a jax array (or asks for devices or
PRNG keys) at import time, which would initialise a backend before the user can configure one
(`jax.distributed.initialize`, `JAX_PLATFORMS`, XLA flags) and, on TPU, grab the chips.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    def initialised():
        from jax._src import xla_bridge
        probe = getattr(xla_bridge, "backends_are_initialized", None)
        if probe is not None:
            return probe()
        if hasattr(xla_bridge, "_backends"):  # older/newer jax without the helper
            return len(xla_bridge._backends) != 0
        sys.exit("no backend probe in this jax: update tests/test_import_side_effects.py")

    import ldm_jax.diffusion, ldm_jax.models.unet, ldm_jax.spec, ldm_jax.sampling
    import ldm_jax.training.ldm_step, ldm_jax.checkpoints, jax
    if initialised():
        sys.exit("importing the core modules initialised a jax backend")

    import ldm_jax
    for info in pkgutil.walk_packages(ldm_jax.__path__, "ldm_jax."):
        importlib.import_module(info.name)
        if initialised():
            sys.exit(f"importing {info.name} initialised a jax backend")

    jax.devices()  # the probe must see a backend once one exists, or the checks above prove nothing
    if not initialised():
        sys.exit("the backend probe does not notice an initialised backend")
    print("ok")
    """
)


def test_importing_ldm_jax_initialises_no_backend():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
