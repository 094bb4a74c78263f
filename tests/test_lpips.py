"""LPIPS-VGG16 parity with the `lpips` PyTorch package (same random trunk, the package's heads;
see tests/references/lpips_reference.py), and the weight conversion CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from references.lpips_reference import reference_lpips

from ldm_jax.training.lpips import LPIPS
from ldm_jax.training.lpips_weights import (
    LPIPSWeightsError,
    convert_lpips_state_dicts,
    load_lpips_params,
    main,
)


@pytest.fixture(scope="module")
def reference():
    return reference_lpips(seed=0)


def test_lpips_matches_lpips_package(reference, parity):
    model, vgg16_sd, heads_sd = reference
    params = convert_lpips_state_dicts(vgg16_sd, heads_sd)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 3, 32, 40)).astype(np.float32)
    x1 = np.clip(x0 + 0.3 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x0), torch.from_numpy(x1)).numpy().reshape(-1)
    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))  # noqa: E731
    ours = jax.jit(LPIPS().apply)({"params": params}, nhwc(x0), nhwc(x1))
    assert ours.shape == (2,) and np.all(np.asarray(ours) > 0)
    parity("lpips vgg16 distance", ours, expected)
    same = LPIPS().apply({"params": params}, nhwc(x0), nhwc(x0))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_lpips_gradient_is_finite_and_matches(reference, parity):
    model, vgg16_sd, heads_sd = reference
    params = convert_lpips_state_dicts(vgg16_sd, heads_sd)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    x1 = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    t1 = torch.from_numpy(x1).requires_grad_(True)
    model(torch.from_numpy(x0), t1).sum().backward()
    grad = jax.grad(
        lambda b: LPIPS().apply({"params": params}, jnp.asarray(x0.transpose(0, 2, 3, 1)), b).sum()
    )(jnp.asarray(x1.transpose(0, 2, 3, 1)))
    assert np.all(np.isfinite(np.asarray(grad)))
    parity("lpips vgg16 input gradient", grad, t1.grad.numpy().transpose(0, 2, 3, 1))


def test_conversion_cli_round_trip(reference, tmp_path, capsys):
    _, vgg16_sd, heads_sd = reference
    vgg_file, heads_file = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
    out = tmp_path / "l.safetensors"
    torch.save(vgg16_sd | {"classifier.0.weight": torch.zeros(2, 2)}, vgg_file)
    torch.save(heads_sd, heads_file)
    assert main(["--vgg16", str(vgg_file), "--heads", str(heads_file), "--out", str(out)]) == 0
    loaded = load_lpips_params(out)
    direct = convert_lpips_state_dicts(vgg16_sd, heads_sd)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    # an existing output is not overwritten silently; a heads file given as --vgg16 is refused
    assert main(["--vgg16", str(vgg_file), "--heads", str(heads_file), "--out", str(out)]) == 2
    swapped = ["--vgg16", str(heads_file), "--heads", str(heads_file), "--out", str(tmp_path / "x")]
    assert main(swapped) == 2
    assert "features.0.weight" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="perceptual_weight=0"):
        load_lpips_params(tmp_path / "absent.safetensors")
