"""`python train.py` with the test-only toy task registered: the train CLI's subprocess tests
(SIGKILL, SIGTERM, multi-host) run this file with tests/ on PYTHONPATH."""

import sys

from ldm_jax.cli.train import main
from support.toy_task import TOY_TASKS

if __name__ == "__main__":
    sys.exit(main(sys.argv, tasks=TOY_TASKS))
