"""Train a latent diffusion model (or its autoencoder) from a config file: the logic is in
ldm_jax/cli/train.py.

    python train.py --config configs/<experiment>.py[:arg] --workdir runs/x [--config.key=value]
    python train.py      # no --config: the built-in default (configs/default.py, runs/default)
    python train.py --help [--config FILE.py]    # the flags and the config file's description
"""

import sys

from ldm_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
