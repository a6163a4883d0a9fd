"""Activation statistics: how many x and y neurons fire, per layer, head and byte; dead and always-on neurons."""

import numpy as np

from .common import CHUNK_SIZE, KINDS, as_bytes, stream_activations

HISTOGRAM_BINS = 20


def activation_stats(model, text, chunk_size: int = CHUNK_SIZE, always_on: float = 0.99, progress: bool = True) -> dict:
    """Fractions of non-zero x and y over every byte of ``text`` (eval mode), as the ``inspect --json`` schema.

    Per layer: ``x_active``, ``y_active`` (all heads), ``x_active_per_head``, ``y_active_per_head``; extras:
    ``{kind}_active_per_byte`` (mean, min, max, quantiles and a histogram of the fraction active at one byte),
    ``{kind}_dead`` (neurons that never fire, as ``[head, neuron]``) and ``{kind}_always_on`` (firing on at least
    ``always_on`` of the bytes).
    """
    data = as_bytes(text)
    c = model.config
    fires = {k: np.zeros((c.n_layer, c.n_head, c.n_neurons), np.int64) for k in KINDS}
    per_byte = {k: [[] for _ in range(c.n_layer)] for k in KINDS}
    for _, acts in stream_activations(model, data, chunk_size, progress, desc="activation stats"):
        for layer, a in enumerate(acts):
            for k in KINDS:
                active = a[k] > 0  # (nh, T, N)
                fires[k][layer] += active.sum(axis=1)
                per_byte[k][layer].append(active.mean(axis=(0, 2)))
    n = len(data)
    layers = []
    for layer in range(c.n_layer):
        entry = {}
        for k in KINDS:
            entry[f"{k}_active"] = float(fires[k][layer].sum() / (n * c.n_head * c.n_neurons))
            entry[f"{k}_active_per_head"] = (fires[k][layer].sum(axis=1) / (n * c.n_neurons)).tolist()
        for k in KINDS:
            entry[f"{k}_active_per_byte"] = distribution(np.concatenate(per_byte[k][layer]))
            entry[f"{k}_dead"] = np.argwhere(fires[k][layer] == 0).tolist()
            entry[f"{k}_always_on"] = np.argwhere(fires[k][layer] >= always_on * n).tolist()
        layers.append(entry)
    return {"layers": layers, "n_bytes": int(n), "always_on_threshold": always_on}


def distribution(values: np.ndarray) -> dict:
    """Summary of per-byte fractions: mean, min, max, 5/50/95% quantiles and a histogram over [0, 1]."""
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    p5, p50, p95 = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95),
            "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()}}
