"""The CPU decoding kernel (numpy on MLX's buffers) gives the MLX step's numbers, and leaves the same cache."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close, with_engine

import bdh_mlx.inference.cpu_kernel as cpu_step
import bdh_mlx.model as model_module
from bdh_mlx import quantize
from bdh_mlx.inference.engines import CPUKernel, MLXDense, MLXSparse, choose_engine, data_address
from bdh_mlx.inference.generate import prefill
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.cache import KEPT_WRITES

TOL = 1e-5


def small_model(silent_heads=()):
    """4 heads of 128 neurons; in ``silent_heads`` only 8 neurons can fire (their other encoder columns are 0)."""
    mx.random.seed(5)
    model = BDH(BDHConfig(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=16, dropout=0.0))
    model.eval()
    for h in silent_heads:
        model.encoder[h, :, 8:] = 0
    return model


def decode(model, idx, cpu_kernel, density, start=6):
    """Logits of tokens ``start`` and on, one at a time after a prefill, and the cache at the end: with the CPU
    kernel, or MLX's step (sparse below ``density``)."""
    model = with_engine(model, CPUKernel(density) if cpu_kernel else MLXSparse(density))
    cache = model.make_cache(idx.shape[0])
    prefill(model, idx[:, :start], cache, chunk_size=4)
    steps = []
    for t in range(start, idx.shape[1]):
        logits, _ = model(idx[:, t : t + 1], cache=cache)
        mx.eval(logits, cache.layers)
        steps.append(logits)
    return mx.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("silent_heads, density, sparse_heads", [
    ((), 0.0, 0),           # dense everywhere
    ((), 1.0, 4),           # every head takes the sparse path
    ((0, 2), 0.15, 2),      # heads 0 and 2 fire on at most 8 of 64 pairs: sparse; the others dense
])
def test_kernel_equals_the_mlx_step(monkeypatch, silent_heads, density, sparse_heads):
    """Two rows, 40 tokens (the kept writes added to S twice): the same logits and the same whole state."""
    idx = mx.random.randint(0, 256, (2, 46), key=mx.random.key(1))
    model = small_model(silent_heads)
    want, want_cache = decode(model, idx, cpu_kernel=False, density=0.0)
    taken = []
    take = cpu_step.take_rows
    monkeypatch.setattr(cpu_step, "take_rows", lambda m, rows, name: taken.append(name) or take(m, rows, name))
    got, cache = decode(model, idx, cpu_kernel=True, density=density)
    assert_close(got, want, f"kernel logits, density {density}", tol=TOL)
    for layer, (s, w) in enumerate(zip(cache.states, want_cache.states, strict=True)):
        assert_close(s, w, f"state of layer {layer}", tol=TOL)
    assert len(taken) == 40 * 3 * 2 * sparse_heads * 3  # tokens, layers, rows, heads, (S, encoder_v, decoder)


def test_kernel_equals_the_full_forward_pass():
    idx = mx.random.randint(0, 256, (1, 30), key=mx.random.key(2))
    model = small_model((1,))
    for density in (0.0, 1.0):
        got, _ = decode(model, idx, cpu_kernel=True, density=density, start=1)
        assert_close(got, model(idx)[0][:, 1:], f"against the parallel form, density {density}", tol=1e-4)


def test_kernel_is_chosen_on_the_cpu_in_float32_only(monkeypatch):
    calls = []
    step = cpu_step.layer_step
    monkeypatch.setattr(cpu_step, "layer_step", lambda *a: calls.append(1) or step(*a))
    config = small_model().config
    assert isinstance(choose_engine(config, mx.float32, mx.cpu), CPUKernel)
    assert type(choose_engine(config, mx.bfloat16, mx.cpu)) is MLXSparse
    assert type(choose_engine(config, mx.float32, mx.gpu)) is MLXSparse
    model = with_engine(small_model(), choose_engine(config, mx.float32, mx.cpu))
    idx = mx.array([[1, 2]])
    model(idx[:, :1], cache=model.make_cache(1))
    assert len(calls) == 3  # one per layer
    with_engine(model, MLXSparse())(idx[:, :1], cache=model.make_cache(1))
    model.train()(idx[:, :1], cache=model.make_cache(1))  # training mode: MLX's step, with dropout if any
    assert len(calls) == 3
    quantized = quantize(small_model(), bits=8, group_size=32)
    assert type(quantized.engine) is MLXDense
    assert type(choose_engine(quantized.config, mx.float32, mx.cpu)) is MLXDense


def test_kernel_continues_a_state_left_by_the_mlx_step():
    """The MLX step adds its kept writes to S when the next token comes; the kernel does it on the way out,
    and takes over a state holding a full set of kept writes."""
    idx = mx.random.randint(0, 256, (1, 30), key=mx.random.key(3))
    model = with_engine(small_model(), MLXSparse())
    cache = model.make_cache(1)
    model(idx[:, :1], cache=cache)
    for t in range(1, KEPT_WRITES):
        model(idx[:, t : t + 1], cache=cache)
    assert cache.layers[0].m == KEPT_WRITES
    model = with_engine(model, CPUKernel())
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(KEPT_WRITES, 30)]
    assert cache.layers[0].m == 30 - KEPT_WRITES  # added to S first: 14 kept since
    assert_close(mx.concatenate(steps, axis=1), model(idx)[0][:, KEPT_WRITES:], "after the MLX step", tol=1e-4)


def test_kernel_adds_kept_writes_to_s_in_place():
    model = with_engine(small_model(), CPUKernel())
    cache = model.make_cache(1)
    prefill(model, mx.array([[3, 4, 5]]), cache, chunk_size=4)
    address = data_address(cache.layers[0].S)
    for t in range(KEPT_WRITES):
        logits, _ = model(mx.array([[t]]), cache=cache)
        mx.eval(logits, cache.layers)
    assert cache.layers[0].m == 0  # the writes were added to S ...
    assert data_address(cache.layers[0].S) == address  # ... in its own buffer


def test_numpy_helpers_equal_the_model_functions():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 64)).astype(np.float32) * 4 + 1
    assert_close(cpu_step.layer_norm(z), model_module.layer_norm(mx.array(z)), "layer norm", tol=TOL)
    cos, sin = (np.asarray(a) for a in model_module.rope_cos_sin(mx.array([7]), model_module.rope_frequencies(64)))
    assert_close(cpu_step.rope(z, cos, sin), model_module.rope(mx.array(z), mx.array(cos), mx.array(sin)), "rope",
                 tol=TOL)
    for rows in (1, 3):
        assert_close(cpu_step.rows_times(z[:rows], z.T), z[:rows] @ z.T, f"{rows} rows", tol=1e-4)


def test_gathered_rows_reuse_a_buffer_that_grows():
    matrix = np.arange(400, dtype=np.float32).reshape(100, 4)
    first = cpu_step.take_rows(matrix, np.array([3, 1]), "test")
    np.testing.assert_array_equal(first, matrix[[3, 1]])
    again = cpu_step.take_rows(matrix, np.array([5, 6, 7]), "test")
    np.testing.assert_array_equal(again, matrix[[5, 6, 7]])
    assert np.shares_memory(first, again)  # one buffer: no fresh memory each token
    many = np.arange(60)
    np.testing.assert_array_equal(cpu_step.take_rows(matrix, many, "test"), matrix[many])


def test_a_head_is_sparse_when_it_is_in_every_row():
    firing = np.zeros((3, 2, 10), dtype=bool)  # (heads, rows, pairs)
    firing[0, :, :2] = True  # 20% in both rows
    firing[1, 0, :2], firing[1, 1, :5] = True, True  # 20% and 50%
    firing[2, :, :5] = True
    np.testing.assert_array_equal(cpu_step.sparse_heads(firing, 0.2), [True, False, False])
    np.testing.assert_array_equal(cpu_step.sparse_heads(firing, 0.5), [True, True, True])
    np.testing.assert_array_equal(cpu_step.sparse_heads(firing, 0.19), [False, False, False])
