"""Samplers and logits processors on hand-built distributions, with exact expected outputs."""

import math

import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx.inference.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

INF = float("inf")
# Probabilities in a shuffled order, so that the filters must put their masks back in place.
PROBS = [0.15, 0.5, 0.1, 0.25]


def logprobs(*rows):
    return mx.log(mx.array(rows))


def kept(x):
    """Indices of the tokens a filter kept, per row."""
    return [sorted(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.array(x)]


def test_greedy_is_argmax():
    lp = logprobs(PROBS, [0.4, 0.1, 0.2, 0.3])
    assert make_sampler(0.0)(lp).tolist() == [1, 0]
    assert make_sampler(0.0, top_k=2, top_p=0.5)(lp, key=mx.random.key(0)).tolist() == [1, 0]


@pytest.mark.parametrize(("k", "want"), [(1, [1]), (2, [1, 3]), (3, [0, 1, 3]), (4, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k(k, want):
    out = apply_top_k(logprobs(PROBS), k)
    assert kept(out) == [want]
    np.testing.assert_array_equal(np.array(out)[0, want], np.log(np.array(PROBS, dtype=np.float32))[want])


@pytest.mark.parametrize(("p", "want"), [(0.3, [1]), (0.7, [1, 3]), (0.8, [0, 1, 3]), (0.95, [0, 1, 2, 3])])
def test_top_p(p, want):
    assert kept(apply_top_p(logprobs(PROBS), p)) == [want]


@pytest.mark.parametrize(("p", "want"), [(0.1, [0, 1, 2, 3]), (0.25, [0, 1, 3]), (0.4, [1, 3]), (0.9, [1])])
def test_min_p(p, want):
    assert kept(apply_min_p(logprobs(PROBS), p)) == [want]


def test_filters_work_row_by_row():
    lp = logprobs(PROBS, [0.05, 0.05, 0.6, 0.3])
    assert kept(apply_top_k(lp, 2)) == [[1, 3], [2, 3]]
    assert kept(apply_top_p(lp, 0.55)) == [[1, 3], [2]]
    assert kept(apply_min_p(lp, 0.4)) == [[1, 3], [2, 3]]


def test_sampling_stays_in_the_filtered_set_and_follows_it():
    lp = mx.broadcast_to(logprobs(PROBS), (4000, 4))
    tokens = np.array(make_sampler(1.0, top_k=2)(lp, key=mx.random.key(1)))
    assert set(tokens.tolist()) == {1, 3}
    # Renormalised over {1, 3}: 0.5 / 0.75 and 0.25 / 0.75.
    assert abs((tokens == 1).mean() - 2 / 3) < 0.03
    assert set(np.array(make_sampler(1.0, min_p=0.4)(lp, key=mx.random.key(2))).tolist()) == {1, 3}
    assert set(np.array(make_sampler(1.0, top_p=0.3)(lp, key=mx.random.key(3))).tolist()) == {1}


def test_temperature_sharpens_and_flattens():
    lp = mx.broadcast_to(logprobs(PROBS), (4000, 4))
    cold = np.array(make_sampler(0.05)(lp, key=mx.random.key(4)))
    assert (cold == 1).mean() > 0.999
    hot = np.array(make_sampler(100.0)(lp, key=mx.random.key(5)))
    assert all(abs((hot == i).mean() - 0.25) < 0.03 for i in range(4))


def test_same_key_same_draw():
    lp = mx.broadcast_to(logprobs(PROBS), (64, 4))
    sampler = make_sampler(1.0, top_p=0.95)
    assert sampler(lp, key=mx.random.key(7)).tolist() == sampler(lp, key=mx.random.key(7)).tolist()
    assert sampler(lp, key=mx.random.key(7)).tolist() != sampler(lp, key=mx.random.key(8)).tolist()


@pytest.mark.parametrize(
    "options",
    [dict(temperature=-0.1), dict(top_p=1.5), dict(top_p=-0.1), dict(min_p=2.0), dict(top_k=-1)],
)
def test_invalid_sampler_values(options):
    with pytest.raises(ValueError):
        make_sampler(**options)


def test_repetition_penalty():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    tokens = mx.array([[0, 1, 1], [3, 3, 2]])
    out = make_repetition_penalty(2.0)(tokens, logits)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.25, 1.5]]
    last_only = make_repetition_penalty(2.0, context_size=1)(tokens, logits)
    assert last_only.tolist() == [[2.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.25, 3.0]]
    empty = mx.zeros((2, 0), dtype=mx.int32)
    assert make_repetition_penalty(2.0)(empty, logits).tolist() == logits.tolist()


def test_make_logits_processors():
    assert make_logits_processors() == [] and make_logits_processors(1.0) == []
    (penalty,) = make_logits_processors(1.5, repetition_context_size=2)
    out = penalty(mx.array([[0, 2, 3]]), mx.array([[3.0, 3.0, 3.0, -3.0]]))
    assert out.tolist() == [[3.0, 3.0, 2.0, -4.5]]
    assert math.isclose(out[0, 2].item(), 3.0 / 1.5)


def test_min_p_zero_keeps_every_token():
    lp = logprobs(PROBS, [1.0, 0.0, 0.0, 0.0])
    assert kept(apply_min_p(lp, 0)) == [[0, 1, 2, 3], [0]]
    np.testing.assert_array_equal(np.array(apply_min_p(lp, 0.0)), np.array(lp))


@pytest.mark.parametrize(("options", "want"), [
    (dict(temperature=1.0, top_k=1, top_p=0.95, min_p=0.05), {1}),  # top-k decides
    (dict(temperature=1.0, top_k=4, top_p=0.3, min_p=0.05), {1}),  # top-p decides
    (dict(temperature=1.0, top_k=4, top_p=0.95, min_p=0.6), {1}),  # min-p decides
    (dict(temperature=1.0, top_k=2, min_p=0.25), {1, 3}),  # both keep more alone: {1, 3} and {0, 1, 3}
    (dict(temperature=2.0, top_p=0.5), {1}),  # filters act at temperature 1: at 2, top-p 0.5 would keep {1, 3}
])
def test_filters_combine_as_the_intersection_at_temperature_one(options, want):
    lp = mx.broadcast_to(logprobs(PROBS), (3000, 4))
    tokens = np.array(make_sampler(**options)(lp, key=mx.random.key(7)))
    assert set(tokens.tolist()) == want
