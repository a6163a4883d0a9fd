"""Activation statistics: how many x and y neurons fire, per layer, head and byte; silent and always-on neurons."""

import numpy as np

from .common import CHUNK_SIZE, KINDS, as_bytes, stream_activations

HISTOGRAM_BINS = 20
ALWAYS_ON = 0.99  # a neuron firing on at least this fraction of the bytes is "always on"
DEAD_MIN_BYTES = 10_000  # below this many bytes a neuron that never fired is "silent in these bytes", not dead


class Moments:
    """Per kind, per (layer, head, neuron): how often a neuron fired, its activation's sum and sum of squares."""

    def __init__(self, config):
        shape = (config.n_layer, config.n_head, config.n_neurons)
        self.n = 0
        self.fires = {k: np.zeros(shape, np.int64) for k in KINDS}
        self.sums = {k: np.zeros(shape, np.float64) for k in KINDS}
        self.squares = {k: np.zeros(shape, np.float64) for k in KINDS}

    def add(self, acts):
        """One chunk of ``stream_activations``."""
        self.n += acts[0]["x"].shape[1]
        for layer, a in enumerate(acts):
            for k in KINDS:
                self.fires[k][layer] += (a[k] > 0).sum(axis=1)
                self.sums[k][layer] += a[k].sum(axis=1, dtype=np.float64)
                self.squares[k][layer] += np.square(a[k], dtype=np.float64).sum(axis=1)

    def rate(self, kind):
        return self.fires[kind] / self.n

    def mean(self, kind):
        return self.sums[kind] / self.n

    def std(self, kind):
        """The population standard deviation of each neuron's activation over the bytes read."""
        return np.sqrt(np.maximum(self.squares[kind] / self.n - self.mean(kind) ** 2, 0))


def activation_stats(model, text, chunk_size: int = CHUNK_SIZE, always_on: float = ALWAYS_ON,
                     progress: bool = True, moments: Moments | None = None) -> dict:
    """Fractions of non-zero x and y over every byte of ``text`` (eval mode), as the ``inspect --json`` schema.

    Per layer: ``x_active``, ``y_active`` (all heads), ``x_active_per_head``, ``y_active_per_head``; extras:
    ``{kind}_active_per_byte`` (mean, min, max, quantiles and a histogram of the fraction active at one byte),
    ``{kind}_silent`` (neurons that did not fire in these ``n_bytes`` bytes, as ``[head, neuron]``; ``dead`` is
    true when ``n_bytes`` >= ``DEAD_MIN_BYTES``, enough to call them dead) and ``{kind}_always_on`` (firing on at
    least ``always_on`` of the bytes). ``moments``: a ``Moments`` to fill as well (per-neuron mean and std).
    """
    data = as_bytes(text)
    c = model.config
    moments = moments if moments is not None else Moments(c)
    per_byte = {k: [[] for _ in range(c.n_layer)] for k in KINDS}
    for _, acts in stream_activations(model, data, chunk_size, progress, desc="activation stats"):
        moments.add(acts)
        for layer, a in enumerate(acts):
            for k in KINDS:
                per_byte[k][layer].append((a[k] > 0).mean(axis=(0, 2)))
    n = len(data)
    layers = []
    for layer in range(c.n_layer):
        entry = {}
        for k in KINDS:
            fires = moments.fires[k][layer]
            entry[f"{k}_active"] = float(fires.sum() / (n * c.n_head * c.n_neurons))
            entry[f"{k}_active_per_head"] = (fires.sum(axis=1) / (n * c.n_neurons)).tolist()
        for k in KINDS:
            fires = moments.fires[k][layer]
            entry[f"{k}_active_per_byte"] = distribution(np.concatenate(per_byte[k][layer]))
            entry[f"{k}_silent"] = np.argwhere(fires == 0).tolist()
            entry[f"{k}_always_on"] = np.argwhere(fires >= always_on * n).tolist()
        layers.append(entry)
    return {"layers": layers, "n_bytes": int(n), "always_on_threshold": always_on, "dead": n >= DEAD_MIN_BYTES}


def silent_meaning(n_bytes: int) -> str:
    """What a neuron that never fired in ``n_bytes`` bytes is: "dead" only over enough bytes to mean it."""
    if n_bytes >= DEAD_MIN_BYTES:
        return f"dead (never fired in {n_bytes:,} bytes)"
    return f"did not fire in these {n_bytes:,} bytes (fewer than {DEAD_MIN_BYTES:,}: too few to call them dead)"


def distribution(values: np.ndarray) -> dict:
    """Summary of per-byte fractions: mean, min, max, 5/50/95% quantiles and a histogram over [0, 1]."""
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    p5, p50, p95 = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95), "n": int(len(values)),
            "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()}}
