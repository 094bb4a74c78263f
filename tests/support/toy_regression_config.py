"""Test scaffolding: a tiny linear-regression run (support/toy_task.py) that exercises the whole
training loop in seconds on CPU.

    python tests/support/train_toy.py --config tests/support/toy_regression_config.py \
        --workdir runs/toy [--config.train.num_steps=200] [--config.optimizer.learning_rate=3e-2]

Used by the loop's tests (resume, SIGTERM, NaN, multi-host) and as a smoke test of a new machine.
"""

from pathlib import Path

import ml_collections

from ldm_jax.training.distributed import distributed_config
from ldm_jax.training.mesh_config import mesh_config
from ldm_jax.training.sharding import DEFAULT_LOGICAL_RULES

PATH = str(Path(__file__).resolve())  # what --config takes


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.trainer = "toy_regression"
    c.seed = 0
    c.workdir_default = "runs/toy_regression"
    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_LOGICAL_RULES
    c.toy = ml_collections.ConfigDict({"dim": 16, "out_dim": 8, "noise": 0.1, "nan_at_step": -1})
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 3e-2, "warmup_steps": 2, "schedule": "cosine", "grad_clip": 1.0,
         "weight_decay": 0.0, "grad_accum_steps": 1}
    )
    c.ema = ml_collections.ConfigDict({"decay": 0.999})
    c.data = ml_collections.ConfigDict({"global_batch_size": 16, "shuffle_seed": 0})
    c.train = ml_collections.ConfigDict(
        {
            "num_steps": 100,
            "log_every": 10,
            "checkpoint_every": 50,
            "sample_every": 0,
            "keep_checkpoints": 3,
            "async_checkpointing": True,
            "progress_bar": True,
            "peak_flops_per_device": 0.0,  # 0: look the device up (unknown on CPU)
            # fault injection for tests: a real SIGKILL / SIGTERM of this process after that step
            "debug": {"kill_at_step": -1, "sigterm_at_step": -1},
        }
    )
    c.distributed = distributed_config()
    return c
