"""Sample images from a latent diffusion checkpoint: ``python sample.py --help``."""

import sys

from ldm_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
