"""The byte counts behind the decoding benchmark's bandwidth and sparse "bound" figures (README claims)."""

import sys
from pathlib import Path

import pytest

from bdh_mlx.model import BDH, BDHConfig

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import generate_speed  # noqa: E402

F32 = 4


@pytest.fixture(scope="module")
def model_and_cache():
    config = BDHConfig(n_layer=3, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, vocab_size=256, dropout=0.0)
    model = BDH(config)
    return model, model.make_cache(2)


def written_out(x, pairs, n_layer=3, nh=2, D=32, N=128, B=2, V=256, K=16):
    """The count, spelled out: an embedding row, lm_head, and per layer the encoder, encoder_v and decoder at
    the firing fraction x, S at the pairs' fraction, the kept writes, S read and written every K tokens."""
    weight = nh * D * N * F32
    state = B * nh * N * D * F32
    kept = B * K * (nh * N + D) * F32
    return D * F32 + D * V * F32 + n_layer * (weight + 2 * weight * x + state * (pairs + 2 / K) + kept)


def test_moved_bytes_of_the_dense_and_sparse_steps(model_and_cache):
    model, cache = model_and_cache
    assert model.config.n_neurons == 128 and generate_speed.KEPT_WRITES == 16
    assert generate_speed.moved_bytes(model, cache) == pytest.approx(written_out(1, 1))
    sparse = generate_speed.moved_bytes(model, cache, [0.05, 0.1, 0.2], [0.1, 0.2, 0.3])
    want = written_out(0.05, 0.1, n_layer=1) + written_out(0.1, 0.2, n_layer=1) + written_out(0.2, 0.3, n_layer=1)
    fixed = written_out(0, 0, n_layer=0)
    assert sparse == pytest.approx(want - 2 * fixed)


def test_step_bytes_counts_the_weights_per_layer_or_once(model_and_cache):
    model, cache = model_and_cache
    weights, state = 3 * 2 * 32 * 128 * F32, 2 * 2 * 128 * 32 * F32
    fixed = 32 * F32 + 32 * 256 * F32
    assert generate_speed.step_bytes(model, cache) == fixed + 3 * (weights + 2 * state)
    assert generate_speed.step_bytes(model, cache, weight_reads=1) == fixed + weights + 3 * 2 * state
