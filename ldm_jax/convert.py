"""`python -m ldm_jax.convert`: the documented name of the converter (ldm_jax/cli/convert.py)."""

import sys

from ldm_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
