"""BDHCache: positions continue across calls, branches are independent, save/load round-trips."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from bdh_mlx.errors import CheckpointError
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.cache import BDHCache


@pytest.fixture(scope="module")
def model():
    mx.random.seed(5)
    m = BDH(BDHConfig.from_preset("tiny", dropout=0.0, chunk_size=4))
    m.eval()
    return m


@pytest.fixture(scope="module")
def idx():
    return mx.random.randint(0, 256, (2, 30), key=mx.random.key(6))


def test_empty_cache_shape_and_size(model):
    c = model.config
    cache = model.make_cache(3)
    assert cache.batch_size == 3 and cache.offset.tolist() == [0, 0, 0]
    assert len(cache.states) == c.n_layer
    assert all(s.shape == (3, c.n_head, c.n_neurons, c.n_embd) and s.dtype == mx.float32 for s in cache.states)
    assert cache.nbytes == c.n_layer * 3 * c.n_head * c.n_neurons * c.n_embd * 4 + 3 * 4


def test_three_uneven_pieces_equal_one_pass(model, idx):
    want, _ = model(idx)
    cache = model.make_cache(2)
    pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 11), (11, 12), (12, 30)]]
    assert_close(mx.concatenate(pieces, axis=1), want, "pieces")
    assert cache.offset.tolist() == [30, 30]
    one_pass = model.make_cache(2)
    model(idx, cache=one_pass)
    for layer, (a, b) in enumerate(zip(cache.states, one_pass.states, strict=True)):
        assert_close(a, b, f"state of layer {layer}")


def test_copy_branches_independently(model, idx):
    cache = model.make_cache(2)
    model(idx[:, :10], cache=cache)
    mx.eval(cache.state)
    before = [np.array(s) for s in cache.states]
    branch = cache.copy()
    other = mx.full((2, 5), 65, dtype=mx.int32)
    got_branch, _ = model(other, cache=branch)
    assert branch.offset.tolist() == [15, 15] and cache.offset.tolist() == [10, 10]
    for layer, s in enumerate(cache.states):
        np.testing.assert_array_equal(np.array(s), before[layer], err_msg=f"layer {layer} changed by the branch")
    got_main, _ = model(idx[:, 10:15], cache=cache)
    assert_close(got_main, model(idx[:, :15])[0][:, 10:], "main continuation")
    assert_close(got_branch, model(mx.concatenate([idx[:, :10], other], axis=1))[0][:, 10:], "branch continuation")


def test_save_load_round_trip(model, idx, tmp_path):
    cache = model.make_cache(2)
    model(idx[:, :17], cache=cache)
    path = tmp_path / "prompt.npz"
    cache.save(path)
    loaded = BDHCache.load(path, config=model.config)
    assert loaded.offset.tolist() == [17, 17]
    for a, b in zip(loaded.states, cache.states, strict=True):
        assert a.dtype == mx.float32
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert_close(model(idx[:, 17:], cache=loaded)[0], model(idx)[0][:, 17:], "continued from the loaded cache")


def test_load_errors(model, tmp_path):
    with pytest.raises(CheckpointError, match="no such cache file"):
        BDHCache.load(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="not a readable .npz cache"):
        BDHCache.load(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a bdh-mlx cache"):
        BDHCache.load(foreign)
    other = BDH(BDHConfig.from_preset("tiny", n_layer=3)).make_cache(1)
    other.save(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        BDHCache.load(tmp_path / "other.npz", config=model.config)


def test_stack_keeps_each_row_at_its_own_position(model, idx):
    rows = []
    for i, length in enumerate([7, 19]):
        row = model.make_cache(1)
        model(idx[i : i + 1, :length], cache=row)
        rows.append(row)
    cache = BDHCache.stack(rows)
    assert cache.offset.tolist() == [7, 19]
    step = mx.array([[idx[0, 7].item()], [idx[1, 19].item()]])
    got, _ = model(step, cache=cache)
    assert_close(got[0, 0], model(idx[:1, :8])[0][0, -1], "row 0")
    assert_close(got[1, 0], model(idx[1:, :20])[0][0, -1], "row 1")


def test_bf16_compute_keeps_the_cache_in_float32(model, idx):
    bf16 = BDH(model.config, compute_dtype=mx.bfloat16)
    bf16.update(model.parameters())
    bf16.eval()
    cache = bf16.make_cache(2)
    logits, _ = bf16(idx[:, :20], cache=cache)
    step, _ = bf16(idx[:, 20:21], cache=cache)
    assert logits.dtype == mx.float32 and step.dtype == mx.float32
    assert all(s.dtype == mx.float32 for s in cache.states)
    want = model(idx[:, :21])[0]
    got = mx.concatenate([logits, step], axis=1)
    err = float(mx.linalg.norm(got - want) / mx.linalg.norm(want))
    assert err < 2e-2, f"bf16 logits: relative error {err:.3g}"


def test_kept_writes_survive_copy_save_and_stack(model, idx, tmp_path):
    """After one-token steps (writes kept aside, then added to S in place): a branch leaves the original
    untouched, ``states`` is the whole state, and a saved and reloaded cache continues the same."""
    cache = model.make_cache(2)
    model(idx[:, :5], cache=cache)
    for t in range(5, 12):  # 7 steps: 7 writes kept aside
        model(idx[:, t : t + 1], cache=cache)
    mx.eval(cache.state)
    assert {layer.m for layer in cache.layers} == {7}
    branch = cache.copy()
    for t in range(12, 30):  # past 16 kept writes: the branch adds them to its S
        model(idx[:, t : t + 1], cache=branch)
    mx.eval(branch.state)
    assert {layer.m for layer in branch.layers} == {9}
    full = model.make_cache(2)
    model(idx[:, :12], cache=full)
    for a, b in zip(cache.states, full.states, strict=True):  # the branch did not write into the original
        assert_close(a, b, "original after the branch")
    path = tmp_path / "decoded.npz"
    branch.save(path)
    loaded = BDHCache.load(path, config=model.config)
    assert loaded.offset.tolist() == [30, 30]
    want = model(mx.concatenate([idx, idx[:, :4]], axis=1))[0][:, 30:]
    assert_close(model(idx[:, :4], cache=loaded)[0], want, "continued from a cache saved mid-decoding")
    rows = BDHCache.stack([BDHCache([s[i : i + 1] for s in branch.states], branch.offset[i : i + 1]) for i in (1, 0)])
    assert_close(rows.states[0], branch.states[0][::-1], "stacked rows")
