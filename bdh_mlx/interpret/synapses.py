"""Synapses: sigma_l(i, j) = sum over tau < t of y_{tau, l-1}[i] * x_{tau, l}[j], per head, kept sparse.

Layer 0 has no previous layer's y, so synapses start at layer 1 (layer l pairs y of layer l - 1 with x of layer l,
within one head). x and y are taken as the model computes them (before RoPE): the paper's Hebbian state in its
graph form. Only pairs that co-fire are stored (scipy.sparse), never the dense N x N.
"""

import numpy as np
import scipy.sparse as sp

from .common import CHUNK_SIZE, InterpretError, as_bytes, check_neuron, render_snippet, stream_activations, windows


def synapse_layers(config, layers=None) -> list:
    """The layers that have synapses (1 .. n_layer - 1), or the ones asked for, checked."""
    layers = list(range(1, config.n_layer)) if layers is None else list(layers)
    for layer in layers:
        check_neuron(config, layer, 0)
        if layer == 0:
            raise InterpretError("layer 0 has no synapses: sigma_l pairs y of layer l - 1 with x of layer l")
    if not layers:
        raise InterpretError("a one-layer model has no synapses (they join layer l - 1 to layer l)")
    return layers


def check_synapses(config, synapses) -> list:
    """``(layer, head, i, j)`` tuples of ints, each checked against ``config``."""
    synapses = [tuple(int(v) for v in s) for s in synapses]
    for layer, head, i, j in synapses:
        synapse_layers(config, [layer])
        check_neuron(config, layer, head, i)
        check_neuron(config, layer, head, j)
    return synapses


def synapse_state(model, text, layers=None, chunk_size: int = CHUNK_SIZE, progress: bool = True) -> dict:
    """sigma after the whole text: ``{(layer, head): csr_matrix (N, N)}``, entry (i, j) = sum_tau y[i] x[j]."""
    layers = synapse_layers(model.config, layers)
    N, nh = model.config.n_neurons, model.config.n_head
    sigma = {(layer, h): sp.csr_matrix((N, N), dtype=np.float64) for layer in layers for h in range(nh)}
    for _, acts in stream_activations(model, text, chunk_size, progress, desc="synapses"):
        for layer, h in sigma:
            y, x = sp.csr_matrix(acts[layer - 1]["y"][h]), sp.csr_matrix(acts[layer]["x"][h])  # (T, N) each
            sigma[layer, h] = sigma[layer, h] + (y.T @ x)
    return sigma


def synapse_series(model, text, synapses, chunk_size: int = CHUNK_SIZE, progress: bool = True) -> np.ndarray:
    """Each synapse ``(layer, head, i, j)``'s strength after every byte: (n_synapses, n_bytes).

    Column t holds sigma after byte t is read (the sum over tau <= t), so the last column is ``synapse_state``'s.
    """
    synapses = check_synapses(model.config, synapses)
    data = as_bytes(text)
    increments = np.zeros((len(synapses), len(data)))
    for start, acts in stream_activations(model, data, chunk_size, progress, desc="synapse series"):
        for s, (layer, head, i, j) in enumerate(synapses):
            inc = acts[layer - 1]["y"][head][:, i] * acts[layer]["x"][head][:, j]
            increments[s, start : start + len(inc)] = inc
    return np.cumsum(increments, axis=1)


def strongest_synapses(sigma: dict, top: int) -> list:
    """The ``top`` entries of largest value over all ``sigma`` matrices: ``(layer, head, i, j, value)``."""
    found = []
    for (layer, head), m in sigma.items():
        coo = m.tocoo()
        keep = np.argsort(-coo.data)[:top]
        found += [(layer, head, int(coo.row[k]), int(coo.col[k]), float(coo.data[k])) for k in keep]
    return sorted(found, key=lambda s: -s[4])[:top]


def per_byte_rates(model, texts, layers, chunk_size, progress) -> list:
    """For each text, sigma after it divided by its length: how fast each synapse grows on that text."""
    rates = []
    for text in texts:
        n = len(as_bytes(text))
        rates.append({key: m / n for key, m in synapse_state(model, text, layers, chunk_size, progress).items()})
    return rates


def mean_rates(rates: list) -> dict:
    return {key: sum(r[key] for r in rates) / len(rates) for key in rates[0]}


def relative(on: sp.spmatrix, off: sp.spmatrix) -> sp.csr_matrix:
    """(on - off) / (on + off + c), c the mean non-zero rate on the concept: near 1 for synapses that grow only
    on the concept, damped for the faint ones (a pure ratio would favour noise)."""
    total = (on + off).tocsr()
    damping = on.data.mean() if on.nnz else 1.0
    total.data = 1 / (total.data + damping)
    return (on - off).multiply(total).tocsr()


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive > a random negative), ties counting half: 1 = perfectly selective, 0.5 = chance."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def concept_synapses(model, concept, other, held_out_concept, held_out_other, top: int = 10, layers=None,
                     n_contexts: int = 3, context: int = 24, chunk_size: int = CHUNK_SIZE,
                     progress: bool = True) -> list:
    """Synapses that grow most on texts about a concept, scored on held-out texts (the monosemantic-synapse test).

    A synapse's rate on a text is its strength after the text per byte. Ranked by ``score``, the ``relative``
    excess of its mean rate on ``concept`` over ``other``; each result has ``layer, head, i, j``, ``score``,
    ``gain`` (the difference of the mean rates), ``selectivity``
    (AUC of held-out concept vs held-out other rates: 1 = always higher on the concept), ``held_out_concept`` /
    ``held_out_other`` (mean rates) and ``contexts``: the concept bytes where it grew most (snippets).
    """
    for name, texts in (("concept", concept), ("other", other), ("held-out concept", held_out_concept),
                        ("held-out other", held_out_other)):
        if not texts:
            raise InterpretError(f"no {name} texts given")
    layers = synapse_layers(model.config, layers)
    run = dict(layers=layers, chunk_size=chunk_size, progress=progress)
    on = mean_rates(per_byte_rates(model, concept, **run))
    off = mean_rates(per_byte_rates(model, other, **run))
    gain = {key: on[key] - off[key] for key in on}
    chosen = strongest_synapses({key: relative(on[key], off[key]) for key in on}, top)
    held = {name: per_byte_rates(model, texts, **run) for name, texts in
            (("concept", held_out_concept), ("other", held_out_other))}

    data = as_bytes(b"\n".join(as_bytes(t).tobytes() for t in concept))
    growth = np.diff(synapse_series(model, data, [s[:4] for s in chosen], chunk_size, progress), axis=1, prepend=0)
    results = []
    for s, (layer, head, i, j, score) in enumerate(chosen):
        rates = {name: np.array([r[layer, head][i, j] for r in held[name]]) for name in held}
        best = np.argsort(-growth[s], kind="stable")[:n_contexts]
        best = best[growth[s][best] > 0]
        results.append({"layer": layer, "head": head, "i": i, "j": j, "score": score, "gain": gain[layer, head][i, j],
                        "selectivity": auc(rates["concept"], rates["other"]),
                        "held_out_concept": float(rates["concept"].mean()),
                        "held_out_other": float(rates["other"].mean()),
                        "contexts": [render_snippet(w) for w in windows(data, best, context)]})
    return results
