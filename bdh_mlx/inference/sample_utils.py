"""Samplers and logits processors: small functions on (B, V) log-probabilities.

A sampler maps log-probabilities (B, V) to tokens (B,): ``sampler(logprobs, key=None)``.
The filters (top-k, top-p, min-p) act on the distribution at temperature 1, then the
temperature scales what is left (as in mlx-lm). A logits processor maps
``(tokens (B, L), logits (B, V)) -> logits``, where ``tokens`` is what each row has seen.
"""

import math
from collections.abc import Callable

import mlx.core as mx

NEG_INF = float("-inf")


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` most likely tokens of each row (ties broken arbitrarily)."""
    if top_k >= logprobs.shape[-1]:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(NEG_INF, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Nucleus: keep the fewest most likely tokens whose probabilities add up to at least ``top_p``."""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely tokens
    keep_sorted = mass_before < top_p
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, NEG_INF)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep the tokens whose probability is at least ``min_p`` times that of the most likely one (0 keeps all)."""
    if min_p <= 0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, NEG_INF)


def categorical_sampling(logprobs: mx.array, temperature: float, key: mx.array | None = None) -> mx.array:
    """Draw one token per row from ``softmax(logprobs / temperature)``."""
    return mx.random.categorical(logprobs * (1.0 / temperature), axis=-1, key=key)


def make_sampler(temperature: float = 0.0, top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0) -> Callable:
    """A sampler ``(logprobs (B, V), key=None) -> tokens (B,)``.

    ``temperature`` 0 is greedy (argmax; the filters do not matter then). ``top_p`` in (0, 1),
    ``min_p`` in (0, 1] and ``top_k`` > 0 switch their filter on; 0 (and ``top_p`` 1) leave it off.
    ``key`` (from ``mx.random.key``) makes the draw reproducible without touching the global RNG.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if temperature == 0:
        return lambda logprobs, key=None: mx.argmax(logprobs, axis=-1)

    filters = []
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def sampler(logprobs, key=None):
        for keep in filters:
            logprobs = keep(logprobs)
        return categorical_sampling(logprobs, temperature, key)

    return sampler


def make_repetition_penalty(penalty: float, context_size: int = 20) -> Callable:
    """Divide positive logits (multiply negative ones) of the tokens among the last ``context_size`` seen."""
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if context_size <= 0:
        raise ValueError(f"repetition context size must be > 0, got {context_size}")

    def repetition_penalty(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.shape[-1] == 0:
            return logits
        seen = tokens[:, -context_size:].astype(mx.int32)
        picked = mx.take_along_axis(logits, seen, axis=-1)
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        return mx.put_along_axis(logits, seen, picked, axis=-1)

    return repetition_penalty


def make_logits_processors(repetition_penalty: float | None = None, repetition_context_size: int = 20) -> list:
    """The logits processors for the given options (an empty list when none is set)."""
    processors = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors
