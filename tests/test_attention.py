"""The three forms of BDH attention (parallel, chunked, recurrent) agree, alone and inside the model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FP32_TOL, assert_close, with_engine
from mlx.utils import tree_flatten
from parity_fixtures import NAMES, fixture_inputs, fixture_model, read_fixture

from bdh_mlx.inference.engines import CPUKernel, MLXDense, MLXSparse, firing_rows
from bdh_mlx.inference.generate import prefill
from bdh_mlx.model import BDH, BDHConfig, chunked_attention, parallel_attention, recurrent_attention_step
from bdh_mlx.modeling.cache import KEPT_WRITES, LayerState, take_rows

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
    """50 tokens: three times the kept writes are added to S (at 16, 32 and 48), and the whole state is right."""
    qr, v = inputs
    assert qr.shape[-2] > 3 * KEPT_WRITES
    state = LayerState(mx.zeros((2, 3, 16, 8)))
    outputs = []
    for t in range(qr.shape[-2]):
        out, state = recurrent_attention_step(qr[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outputs.append(out)
    assert state.m == qr.shape[-2] - 3 * KEPT_WRITES
    assert_close(mx.concatenate(outputs, axis=-2), parallel_attention(qr, v), "recurrent")
    assert_close(state.whole(), qr.swapaxes(-1, -2) @ v, "recurrent final state")


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


ENGINES = {  # name: (engine, numpy row gathers per layer and token, firing_rows calls per layer and token)
    "the equations (no engine)": (lambda: None, 0, 0),
    "MLX dense": (MLXDense, 0, 0),
    "MLX sparse, every token sparse": (lambda: MLXSparse(1.0), 0, 1),
    "MLX sparse, dense above 0": (lambda: MLXSparse(0.0), 0, 0),
    "CPU kernel, dense": (lambda: CPUKernel(0.0), 0, 0),
    "CPU kernel, every head sparse": (lambda: CPUKernel(1.0), 2 * 2 * 3, 0),  # rows x heads x (S, encoder_v, decoder)
}


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_decodes_as_the_parallel_form(monkeypatch, name):
    """40 tokens one by one after a prefill (two rows, kept writes added twice): each decoding engine gives the
    parallel form's logits; the sparse ones really read rows (with MLX operations, or numpy's on the CPU)."""
    import bdh_mlx.inference.cpu_kernel as cpu_step
    import bdh_mlx.inference.engines as engines

    make, gathers, firing = ENGINES[name]
    taken = {"gathers": 0, "firing": 0}
    monkeypatch.setattr(engines, "firing_rows",
                        lambda x, d: taken.update(firing=taken["firing"] + 1) or firing_rows(x, d))
    take = cpu_step.take_rows
    monkeypatch.setattr(cpu_step, "take_rows",
                        lambda m, rows, what: taken.update(gathers=taken["gathers"] + 1) or take(m, rows, what))
    idx = mx.random.randint(0, 256, (2, 50), key=mx.random.key(3))
    model = with_engine(tiny_model(attention="parallel"), make())
    cache = model.make_cache(2)
    steps = [prefill(model, idx[:, :10], cache, chunk_size=4)[:, None]]
    for t in range(10, idx.shape[1] - 1):
        logits, _ = model(idx[:, t : t + 1], cache=cache)
        mx.eval(logits, cache.state)
        steps.append(logits)
    assert_close(mx.concatenate(steps, axis=1), model(idx[:, :-1])[0][:, 9:], f"token by token, {name}")
    n_steps = 39 * model.config.n_layer
    assert taken == {"gathers": n_steps * gathers, "firing": n_steps * firing}


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
    """x (B 1, nh 4, 1, N) with ``active_per_row[h]`` non-zero entries per head, v, and a random state."""
    rng = np.random.default_rng(seed)
    x = np.zeros((1, len(active_per_row), 1, N), np.float32)
    for h, k in enumerate(active_per_row):
        x[0, h, 0, rng.choice(N, k, replace=False)] = rng.random(k) + 0.1
    v = rng.normal(size=(1, 1, 1, D)).astype(np.float32)
    state = rng.normal(size=(1, len(active_per_row), N, D)).astype(np.float32)
    return x, v, state


@pytest.mark.parametrize("active", [(0, 0, 0, 0), (0, 3, 1, 256), (5, 9, 2, 7), (40, 70, 100, 90)])
def test_firing_rows_cover_the_firing_pairs_and_neurons(active):
    """Every neuron of a pair with a non-zero entry is among the rows, every non-zero neuron among the
    neurons, once; heads are padded to a common multiple of 32; too many firing pairs give None."""
    x, _, _ = step_inputs(active, N=256)
    rows, neurons = (np.array(a) for a in firing_rows(mx.array(x), max_density=1.0))
    pairs = np.maximum(x[0, :, 0, 0::2], x[0, :, 0, 1::2]) > 0
    most_pairs, most = pairs.sum(axis=-1).max(), (x > 0).sum(axis=-1).max()
    assert rows.shape == (1, 4, 2 * min(max(-(-most_pairs // 32) * 32, 1), 128))
    assert neurons.shape == (1, 4, min(max(-(-most // 32) * 32, 1), 256))
    for h in range(4):
        assert len(set(rows[0, h])) == rows.shape[-1] and len(set(neurons[0, h])) == neurons.shape[-1]
        want = {n for i in np.flatnonzero(pairs[h]) for n in (2 * i, 2 * i + 1)}
        assert want <= set(rows[0, h]), h
        assert set(np.flatnonzero(x[0, h, 0])) <= set(neurons[0, h]), h
    if most_pairs:
        assert firing_rows(mx.array(x), max_density=(most_pairs - 0.5) / 128) is None
        assert firing_rows(mx.array(x), max_density=(most_pairs + 0.5) / 128) is not None


def test_take_rows_of_a_state_and_of_shared_weights():
    rng = np.random.default_rng(1)
    state, weights = rng.normal(size=(2, 3, 10, 4)), rng.normal(size=(3, 10, 4))
    rows = rng.integers(0, 10, (2, 3, 5))
    got_state, got_weights = (np.array(take_rows(mx.array(m), mx.array(rows))) for m in (state, weights))
    for b in range(2):
        for h in range(3):
            np.testing.assert_array_equal(got_state[b, h], state[b, h, rows[b, h]].astype(np.float32))
            np.testing.assert_array_equal(got_weights[b, h], weights[h, rows[b, h]].astype(np.float32))


@pytest.mark.parametrize("active", [(0, 0, 0, 0), (0, 3, 1, 64), (5, 9, 2, 7), (64, 64, 64, 64)])
@pytest.mark.parametrize("kept", [0, 5, KEPT_WRITES])
def test_step_read_at_firing_rows_equals_the_dense_step(active, kept):
    """All-zero rows, fully dense rows and mixed, with writes kept aside (or about to be added to S)."""
    x, v, state = step_inputs(active)
    rng = np.random.default_rng(2)
    Q, V = rng.normal(size=(1, 4, KEPT_WRITES, 64)), np.zeros((1, 1, KEPT_WRITES, 8))
    V[:, :, :kept] = rng.normal(size=(1, 1, kept, 8))
    whole = state + Q.swapaxes(-1, -2) @ V
    qr = mx.array(x) * 0.7  # zero where x is: the firing rows are where qr is non-zero
    want_out, want_state = np.array(qr) @ whole, whole + np.array(qr).swapaxes(-1, -2) * v
    layer = LayerState(*(mx.array(a, dtype=mx.float32) for a in (state, Q, V)), kept)
    for rows in (None, firing_rows(mx.array(x), max_density=1.0)[0]):
        out, new = recurrent_attention_step(qr, mx.array(v), layer, rows)
        np.testing.assert_allclose(np.array(out), want_out, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.array(new.whole()), want_state, atol=1e-5, rtol=1e-5)
        assert new.m == kept % KEPT_WRITES + 1


def test_decoding_steps_add_kept_writes_in_place():
    """Once the cache lets go of the old state, adding the kept writes writes into its buffer."""
    _, v, state = step_inputs((3, 0, 5, 1), N=4096, D=64)  # a 4 MB state
    qr = mx.random.normal((1, 4, 1, 4096))
    layer = LayerState(mx.array(state), None, None, 0)
    for _ in range(KEPT_WRITES):
        out, layer = recurrent_attention_step(qr, mx.array(v), layer)
    mx.eval(out, layer)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out, layer = recurrent_attention_step(qr, mx.array(v), layer)  # adds the 16 kept writes to S
    assert layer.m == 1
    mx.eval(out, layer)
    assert mx.get_peak_memory() - before < state.nbytes / 2


def test_sparse_decoding_in_bfloat16_follows_the_dense_step():
    """Computing in bf16, the sparse step (its encoder_v rows made in bf16) gives the dense step's logits."""
    idx = mx.random.randint(0, 256, (1, 30), key=mx.random.key(4))
    engines = {density: MLXSparse(density) for density in (0.0, 1.0)}
    logits = {}
    for density, engine in engines.items():
        model = with_engine(tiny_model(), engine, compute_dtype=mx.bfloat16)
        cache = model.make_cache(1)
        prefill(model, idx[:, :5], cache, chunk_size=8)
        logits[density] = mx.concatenate([model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 30)], axis=1)
    assert engines[0.0].rows.value is None and engines[1.0].rows.value.dtype == mx.bfloat16
    want = np.array(tiny_model()(idx)[0][:, 5:])  # float32, parallel; logits of about 0.5
    for density, got in logits.items():
        np.testing.assert_allclose(np.array(got), want, atol=1e-2, err_msg=f"density {density}")
    np.testing.assert_allclose(np.array(logits[1.0]), np.array(logits[0.0]), atol=1e-3)


def test_the_sparse_step_copy_of_encoder_v_stays_out_of_the_model_state():
    """Neither saved nor traced by the compiled training step; made again when encoder_v is replaced or edited
    in place (an ablation), so that sparse decoding always uses the current weights."""
    from mlx.utils import tree_flatten

    idx = mx.random.randint(0, 256, (1, 12), key=mx.random.key(8))
    dense = with_engine(tiny_model(), MLXSparse())
    dense(idx[:, :1], cache=dense.make_cache(1))  # about 75% of pairs fire: the dense step
    assert dense.engine.rows.value is None  # a dense model never makes the copy
    model = with_engine(dense, MLXSparse(1.0))

    def rows():
        return model.engine.encoder_v_rows(model.encoder_v, mx.float32)

    def decoded():
        cache = model.make_cache(1)
        prefill(model, idx[:, :4], cache, chunk_size=4)
        steps = mx.concatenate([model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 12)], axis=1)
        assert_close(steps, model(idx)[0][:, 4:], "sparse decoding against the full forward pass")

    decoded()
    first = rows()
    assert first is rows()  # kept
    names = {k for k, _ in tree_flatten(model.state)}
    assert not any("encoder_v_rows" in n for n in names), names
    model.encoder_v = model.encoder_v * 2  # replaced
    np.testing.assert_array_equal(np.array(rows()), 2 * np.array(first))
    decoded()
    model.encoder_v[:, :, :40] = 0  # edited in place: the same Python object
    assert not np.array(rows())[:, :40].any()
    decoded()
    model.encoder_v += 1
    decoded()


def test_one_token_steps_in_training_mode_keep_dropout():
    """The sparse step is for inference: in training mode a cached one-token step still drops out."""
    model = with_engine(tiny_model(dropout=0.5), MLXSparse(1.0)).train()
    cache = model.make_cache(1)
    model(mx.array([[1, 2, 3]]), cache=cache)
    a, b = (model(mx.array([[4]]), cache=cache.copy())[0] for _ in range(2))
    assert not np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("attention", ["parallel", "chunked"])
def test_masked_padding_writes_nothing_and_is_not_attended(attention):
    """Left padding under ``mask`` (with positions shifted back by the cache's offset) leaves the real
    tokens' logits and the state exactly as without it."""
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0,
                          attention=attention, chunk_size=4)).eval()
    idx = mx.array([[5, 17, 99, 3, 250, 7, 42]])
    pad = 3
    plain_cache = model.make_cache(1)
    want, _ = model(idx, cache=plain_cache)
    padded_cache = model.make_cache(1)
    padded_cache.offset = mx.array([-pad], dtype=mx.int32)
    padded = mx.concatenate([mx.array([[200] * pad]), idx], axis=1)
    mask = mx.array([[False] * pad + [True] * idx.shape[1]])
    got, _ = model(padded, cache=padded_cache, mask=mask)
    np.testing.assert_allclose(np.array(got[:, pad:]), np.array(want), atol=1e-5)
    for a, b in zip(padded_cache.states, plain_cache.states, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    unmasked, _ = model(padded, cache=model.make_cache(1))
    assert not np.allclose(np.array(unmasked[:, pad:]), np.array(want), atol=1e-3)  # the mask is what makes it equal
