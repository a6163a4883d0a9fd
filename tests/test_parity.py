"""The MLX model against the PyTorch reference fixtures (tests/make_fixtures.py): logits, loss, gradients, RoPE."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity_fixtures import NAMES, fixture_inputs, fixture_model, read_fixture

# Chunk sizes that do not divide the fixtures' lengths, so a partial last chunk is exercised.
CHUNK = {"base": 5, "odd_heads": 7, "single_token": 3, "long": 96}
FP32_TOL = 1e-4
BF16_REL_TOL = 2e-2  # measured: at most 6e-3 relative error of the logits
BF16_LOSS_REL_TOL = 2e-3  # measured: at most 4e-5 relative error of the loss


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    return request.param, read_fixture(request.param)


def assert_close(got, want, what, tol=FP32_TOL):
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    assert np.allclose(got, want, atol=tol, rtol=tol), f"{what}: max abs diff {diff:.3g}"


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
    model = fixture_model(f).set_compute_dtype(mx.bfloat16)
    logits, loss = model(*fixture_inputs(f))
    assert logits.dtype == mx.float32 and model.encoder.dtype == mx.float32
    err = relative_error(logits, f["logits"])
    assert err < BF16_REL_TOL, f"{name} bf16 logits: relative error {err:.3g}"
    loss_err = abs(loss.item() - f["loss"].item()) / f["loss"].item()
    assert loss_err < BF16_LOSS_REL_TOL, f"{name} bf16 loss: relative error {loss_err:.3g}"


@pytest.mark.parametrize("attention", ["parallel", "chunked"])
def test_attention_forms(fixture, attention):
    name, f = fixture
    model = fixture_model(f, attention=attention, chunk_size=CHUNK[name])
    logits, _ = model(*fixture_inputs(f))
    assert_close(logits, f["logits"], f"{name} {attention} logits")


def test_token_by_token(fixture):
    name, f = fixture
    model = fixture_model(f)
    idx, _ = fixture_inputs(f)
    cache = model.make_cache(idx.shape[0])
    steps = []
    for t in range(idx.shape[1]):
        logits, _ = model(idx[:, t : t + 1], cache=cache)
        mx.eval(logits, cache.state)
        steps.append(logits)
    assert_close(mx.concatenate(steps, axis=1), f["logits"], f"{name} token-by-token logits")
    assert cache.offset.tolist() == [idx.shape[1]] * idx.shape[0]


def test_prefill_then_steps(fixture):
    name, f = fixture
    model = fixture_model(f, chunk_size=CHUNK[name])
    idx, _ = fixture_inputs(f)
    T = idx.shape[1]
    prefill = max(T - 4, 1)
    cache = model.make_cache(idx.shape[0])
    parts = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, T):
        parts.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert_close(mx.concatenate(parts, axis=1), f["logits"], f"{name} prefill + steps logits")
