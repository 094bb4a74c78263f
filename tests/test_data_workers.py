"""grain worker processes (data.num_workers > 0) give the same batches and a resumable state.

Runs in a subprocess: grain's workers are spawned and re-import the main module, which needs a
`__main__` guard (and absl flags marked parsed, which the loader does)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from ldm_jax.data import default_data_config, make_train_dataset

    def batches(num_workers, state=None, n=4):
        records = [{"image": np.full((6, 7, 3), i, np.uint8), "label": i} for i in range(10)]
        config = default_data_config(image_size=4, label_key="label", num_workers=num_workers)
        with make_train_dataset(config, None, 4, 5, source=records) as iterator:
            if state is not None:
                iterator.set_state(state)
            out = [next(iterator) for _ in range(n)]
            return out, json.loads(json.dumps(iterator.get_state()))

    def same(a, b):
        return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)

    if __name__ == "__main__":
        reference, _ = batches(0, n=6)
        with_workers, state = batches(2)
        assert same(with_workers, reference[:4])
        resumed, _ = batches(2, state, n=2)
        assert same(resumed, reference[4:])
        print("OK")
    """
)


def test_worker_processes_match_in_process_loading(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
