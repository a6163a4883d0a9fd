"""The three forms of BDH attention (parallel, chunked, recurrent) agree, alone and inside the model."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FP32_TOL, assert_close
from mlx.utils import tree_flatten
from parity_fixtures import NAMES, fixture_inputs, fixture_model, read_fixture

from bdh_mlx.generate import prefill
from bdh_mlx.model import (
    BDH,
    BDHConfig,
    chunked_attention,
    parallel_attention,
    recurrent_attention_step,
    sparse_attention_step,
)

TOL = FP32_TOL


def reference_attention(qr, v):
    """out_t = sum_{s < t} (qr_t . qr_s) v_s, in float64 with explicit loops over t."""
    qr, v = np.asarray(qr, dtype=np.float64), np.asarray(v, dtype=np.float64)
    out = np.zeros(qr.shape[:-1] + v.shape[-1:])
    for t in range(1, qr.shape[-2]):
        weights = np.einsum("bhn,bhsn->bhs", qr[:, :, t], qr[:, :, :t])
        out[:, :, t] = np.einsum("bhs,bxsd->bhd", weights, v[:, :, :t])
    return out


@pytest.fixture(scope="module")
def inputs():
    key_q, key_v = mx.random.split(mx.random.key(0))
    qr = mx.random.normal((2, 3, 50, 16), key=key_q) * 0.5  # B 2, nh 3, T 50, N 16
    v = mx.random.normal((2, 1, 50, 8), key=key_v)  # one value stream shared by the heads
    return qr, v


def test_parallel_matches_reference(inputs):
    qr, v = inputs
    assert_close(parallel_attention(qr, v), reference_attention(qr, v), "parallel")


@pytest.mark.parametrize("chunk_size, group", [(1, None), (7, None), (7, 1), (7, 3), (10, None), (50, None), (64, 2)])
def test_chunked_matches_parallel(inputs, chunk_size, group):
    qr, v = inputs
    out, state = chunked_attention(qr, v, None, chunk_size, group)
    assert state.dtype == mx.float32 and state.shape == (2, 3, 16, 8)
    assert_close(out, parallel_attention(qr, v), f"chunked {chunk_size}, groups of {group}")
    assert_close(state, qr.swapaxes(-1, -2) @ v, f"chunked {chunk_size} final state")


def test_recurrent_matches_parallel(inputs):
    qr, v = inputs
    state = mx.zeros((2, 3, 16, 8))
    outputs = []
    for t in range(qr.shape[-2]):
        out, state = recurrent_attention_step(qr[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outputs.append(out)
    assert_close(mx.concatenate(outputs, axis=-2), parallel_attention(qr, v), "recurrent")


def test_chunked_continues_a_state(inputs):
    qr, v = inputs
    first, state = chunked_attention(qr[:, :, :23], v[:, :, :23], None, 6)
    second, _ = chunked_attention(qr[:, :, 23:], v[:, :, 23:], state, 4)
    assert_close(mx.concatenate([first, second], axis=-2), parallel_attention(qr, v), "chunked in two calls")


def tiny_model(**overrides):
    mx.random.seed(1)
    model = BDH(BDHConfig.from_preset("tiny", **{"dropout": 0.0, **overrides}))
    model.eval()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [103, 128])  # divides T = 1030, does not
def test_model_forms_agree_at_1030_tokens(chunk_size):
    idx = mx.random.randint(0, 256, (2, 1030), key=mx.random.key(2))
    parallel = tiny_model(attention="parallel")
    want, _ = parallel(idx)
    chunked = tiny_model(attention="chunked", chunk_size=chunk_size)
    assert_close(chunked(idx)[0], want, f"chunked {chunk_size}")
    cache = chunked.make_cache(2)
    assert_close(prefill(chunked, idx[:, :-1], cache, chunk_size=300), want[:, -2], "cached prefill")
    assert_close(chunked(idx[:, -1:], cache=cache)[0][:, 0], want[:, -1], "one step after the prefill")


@pytest.mark.slow
def test_model_token_by_token_at_1030_tokens():
    idx = mx.random.randint(0, 256, (2, 1030), key=mx.random.key(2))
    model = tiny_model(attention="parallel")
    cache = model.make_cache(2)
    steps = []
    for t in range(idx.shape[1]):
        logits, _ = model(idx[:, t : t + 1], cache=cache)
        mx.eval(logits, cache.state)
        steps.append(logits)
    assert_close(mx.concatenate(steps, axis=1), model(idx)[0], "token by token")


def test_auto_switches_to_chunked_for_long_sequences():
    model = tiny_model(attention="auto", chunk_size=8)
    # T (N + D) against 1.5 (C (N + D) + 2 N D) with N 128, D 32, C 8: the switch is at T = 88.8
    assert [model.attention_form(T, cached=False) for T in (88, 89)] == ["parallel", "chunked"]
    idx = mx.random.randint(0, 256, (1, 100), key=mx.random.key(3))
    assert_close(model(idx)[0], tiny_model(attention="parallel")(idx)[0], "auto")


def loss_and_gradients(form, train=False, **overrides):
    """Loss and gradients of a tiny model on 2 x 64 tokens; the random state is seeded first."""
    data = mx.random.randint(0, 256, (2, 65), key=mx.random.key(4))
    model = tiny_model(attention=form, chunk_size=10, **overrides).train(train)
    mx.random.seed(7)
    loss, grads = nn.value_and_grad(model, lambda m, x, y: m(x, y)[1])(model, data[:, :-1], data[:, 1:])
    return loss.item(), dict(tree_flatten(grads))


def assert_same_gradients(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    assert abs(loss - want_loss) < TOL
    for name, g in want_grads.items():
        err = float(mx.linalg.norm(grads[name] - g) / mx.linalg.norm(g))
        assert err < TOL, f"{name}: relative gradient error {err:.3g}"


def test_chunked_gradients_equal_parallel_gradients():
    """The chunked form recomputes each head in the backward pass: the gradients do not change."""
    assert_same_gradients(loss_and_gradients("chunked"), loss_and_gradients("parallel"))


def test_recomputed_heads_redraw_the_same_dropout():
    """With dropout, the recomputed heads redraw the forward pass's masks: the parallel form's gradients."""
    chunked = loss_and_gradients("chunked", train=True, dropout=0.5)
    assert abs(chunked[0] - loss_and_gradients("chunked")[0]) > 1e-3  # dropout is on
    assert_same_gradients(chunked, loss_and_gradients("parallel", train=True, dropout=0.5))


@pytest.mark.parametrize("name", NAMES)
def test_fixtures_in_uneven_cached_pieces(name):
    """The official logits, from the cache fed in three uneven pieces (chunked, then stepping)."""
    f = read_fixture(name)
    model = fixture_model(f, chunk_size=3)
    idx, _ = fixture_inputs(f)
    T = idx.shape[1]
    cuts = sorted({0, T // 3, T // 3 + T // 5 + 1, T} & set(range(T + 1)))
    cache = model.make_cache(idx.shape[0])
    parts = [model(idx[:, a:b], cache=cache)[0] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    assert_close(mx.concatenate(parts, axis=1), f["logits"], f"{name} in pieces {cuts}")


def step_inputs(active_per_row, N=64, D=8, seed=0):
    """qr (B 1, nh 4, 1, N) with ``active_per_row[h]`` non-zero entries per head, v, and a random state."""
    rng = np.random.default_rng(seed)
    qr = np.zeros((1, len(active_per_row), 1, N), np.float32)
    for h, k in enumerate(active_per_row):
        qr[0, h, 0, rng.choice(N, k, replace=False)] = rng.normal(size=k)
    v = rng.normal(size=(1, 1, 1, D)).astype(np.float32)
    state = rng.normal(size=(1, len(active_per_row), N, D)).astype(np.float32)
    return qr, v, state


@pytest.mark.parametrize("active", [(0, 0, 0, 0), (0, 3, 1, 64), (5, 9, 2, 7), (64, 64, 64, 64)])
def test_sparse_step_equals_the_dense_step(active):
    """All-zero rows, fully dense rows and mixed: the read and the new state of out = qr S, S + qr^T v."""
    qr, v, state = step_inputs(active)
    want_out, want_state = qr @ state, state + qr.swapaxes(-1, -2) * v  # numpy, float32
    for step in (recurrent_attention_step, partial(sparse_attention_step, max_density=1.0)):
        out, new_state = step(mx.array(qr), mx.array(v), mx.array(state))
        np.testing.assert_allclose(np.array(out), want_out, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.array(new_state), want_state, atol=1e-5, rtol=1e-5)


def test_decoding_steps_update_the_state_in_place():
    """Once the cache lets go of the old state, the step writes into its buffer: no second state in memory."""
    qr, v, state = step_inputs((3, 0, 5, 1), N=4096, D=64)  # a 4 MB state
    for step in (recurrent_attention_step, sparse_attention_step):
        s = mx.array(state)
        mx.eval(s)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out, s = step(mx.array(qr), mx.array(v), s)
        mx.eval(out, s)
        assert mx.get_peak_memory() - before < state.nbytes / 2, step.__name__
