"""The MLX model against the PyTorch reference fixtures (tests/make_fixtures.py): logits, loss, gradients, RoPE."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FP32_TOL, assert_close
from mlx.utils import tree_flatten
from parity_fixtures import NAMES, fixture_inputs, fixture_model, read_fixture

# Chunk sizes that do not divide the fixtures' lengths, so a partial last chunk is exercised.
CHUNK = {"base": 5, "odd_heads": 7, "single_token": 3, "long": 96}
BF16_REL_TOL = 2e-2  # measured: at most 6e-3 relative error of the logits
BF16_LOSS_REL_TOL = 2e-3  # measured: at most 4e-5 relative error of the loss


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    return request.param, read_fixture(request.param)


def relative_error(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, dtype=np.float32) - want) / max(np.linalg.norm(want), 1e-30))


def test_fixtures_cover_the_required_cases():
    configs = {name: read_fixture(name) for name in NAMES}
    assert any(f["config"]["n_head"] % 2 for f in configs.values()), "no odd head count"
    assert any(f["idx"].shape[1] == 1 for f in configs.values()), "no T = 1"
    assert any(f["idx"].shape[1] >= 512 for f in configs.values()), "no T >= 512"


def test_logits_and_loss(fixture):
    name, f = fixture
    model = fixture_model(f)
    logits, loss = model(*fixture_inputs(f))
    assert logits.dtype == mx.float32
    assert_close(logits, f["logits"], f"{name} logits")
    assert_close(loss, f["loss"], f"{name} loss")


def test_gradients(fixture):
    name, f = fixture
    model = fixture_model(f)
    idx, targets = fixture_inputs(f)
    loss, grads = nn.value_and_grad(model, lambda m: m(idx, targets)[1])(model)
    assert_close(loss, f["loss"], f"{name} loss")
    grads = dict(tree_flatten(grads))
    assert sorted(grads) == sorted(k[len("grad.") :] for k in f if k.startswith("grad."))
    for key, g in grads.items():
        want = f[f"grad.{key}"]
        if not np.any(want):  # e.g. T = 1: nothing to attend to, so y = 0 and the neuron weights get no gradient
            assert not np.any(np.array(g)), f"{name} grad {key}: expected all zeros"
            continue
        err = relative_error(g, want)
        assert err < FP32_TOL, f"{name} grad {key}: relative error {err:.3g}"


def test_rope_frequencies(fixture):
    name, f = fixture
    model = fixture_model(f)
    want = f["attn.freqs"]
    assert want.shape == (1, 1, 1, model.config.n_neurons)
    got = np.array(model._freqs)
    assert got.dtype == np.float32
    np.testing.assert_array_max_ulp(got, want.ravel(), maxulp=1)


def test_bf16_compute(fixture):
    name, f = fixture
    model = fixture_model(f, compute_dtype=mx.bfloat16)
    activations = []
    logits, loss = model(*fixture_inputs(f), activations=activations)
    assert logits.dtype == mx.float32 and loss.dtype == mx.float32
    assert activations[0]["x"].dtype == mx.bfloat16  # the compute really is bf16
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))  # the weights stay float32
    err = relative_error(logits, f["logits"])
    assert err < BF16_REL_TOL, f"{name} bf16 logits: relative error {err:.3g}"
    loss_err = abs(loss.item() - f["loss"].item()) / f["loss"].item()
    assert loss_err < BF16_LOSS_REL_TOL, f"{name} bf16 loss: relative error {loss_err:.3g}"
