"""`python train.py` with the test-only toy task registered: the train CLI's subprocess tests
(SIGKILL, SIGTERM, multi-host) run this file with tests/ on PYTHONPATH. It also prints how the
mesh was built and the process_index of each mesh device, for the multi-host mesh tests."""

import logging
import sys

from ldm_jax.cli.train import main
from ldm_jax.training.mesh import process_layout
from support.toy_task import TOY_TASKS, make_task


def _toy_printing_its_mesh(config):
    task = make_task(config)
    print(f"mesh process layout: {process_layout(task.mesh).tolist()}", flush=True)
    return task


if __name__ == "__main__":
    mesh_log = logging.getLogger("ldm_jax.training.mesh")
    mesh_log.setLevel(logging.INFO)
    mesh_log.addHandler(logging.StreamHandler(sys.stdout))
    sys.exit(main(sys.argv, tasks={**TOY_TASKS, "toy_regression": _toy_printing_its_mesh}))
