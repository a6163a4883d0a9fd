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


def synapse_sums(model, text, layers=None, powers=(1,), chunk_size: int = CHUNK_SIZE, progress: bool = True,
                 skip: int = 0) -> dict:
    """``{p: {(layer, head): csr (N, N)}}``, entry (i, j) = sum over the bytes (from byte ``skip`` on) of
    (y[i] x[j]) ** p; p = 0 counts the bytes where the pair co-fired (where the synapse grew)."""
    layers = synapse_layers(model.config, layers)
    N, nh = model.config.n_neurons, model.config.n_head
    sums = {p: {(layer, h): sp.csr_matrix((N, N), dtype=np.float64) for layer in layers for h in range(nh)}
            for p in powers}
    for start, acts in stream_activations(model, text, chunk_size, progress, desc="synapses"):
        rows = slice(max(0, skip - start), None)
        for layer, h in sums[powers[0]]:
            y, x = (sp.csr_matrix(acts[layer - k][kind][h][rows]) for k, kind in ((1, "y"), (0, "x")))  # (T, N)
            for p in powers:
                yp, xp = y.copy(), x.copy()
                yp.data, xp.data = yp.data.astype(np.float64) ** p, xp.data.astype(np.float64) ** p
                sums[p][layer, h] = sums[p][layer, h] + (yp.T @ xp)
    return sums


def synapse_state(model, text, layers=None, chunk_size: int = CHUNK_SIZE, progress: bool = True) -> dict:
    """sigma after the whole text: ``{(layer, head): csr_matrix (N, N)}``, entry (i, j) = sum_tau y[i] x[j]."""
    return synapse_sums(model, text, layers, (1,), chunk_size, progress)[1]


WARM_UP = 32  # bytes at the start of a text, where the state is empty and activations spike


def changing_synapses(model, text, top: int = 5, min_steps: int | None = None, layers=None,
                      chunk_size: int = CHUNK_SIZE, progress: bool = True, skip: int = WARM_UP) -> list:
    """The synapses whose growth along ``text`` varies most: ``(layer, head, i, j, cv, steps)``, largest cv first.

    ``cv`` is the coefficient of variation of the per-byte increments y[i] x[j] over the T bytes: 0 for a synapse
    that grows at a constant rate (an always-on pair, a straight line), sqrt(T / k - 1) for one that grows by
    equal steps at k bytes. Only synapses that grew at ``min_steps`` bytes or more (default: 1% of the bytes, at
    least 3) are ranked, so that one stray co-firing is not a "step". The first ``skip`` bytes (at most half the
    text) are left out of the ranking: there the state is still empty and a few large activations would dominate.
    """
    skip = min(skip, len(as_bytes(text)) // 2)
    n = len(as_bytes(text)) - skip
    min_steps = max(3, n // 100) if min_steps is None else min_steps
    sums = synapse_sums(model, text, layers, (0, 1, 2), chunk_size, progress, skip)
    found = []
    for key, steps in sums[0].items():
        steps = steps.tocoo()
        keep = steps.data >= min_steps
        if not keep.any():
            continue
        i, j = steps.row[keep], steps.col[keep]
        s1, s2 = np.asarray(sums[1][key][i, j]).ravel(), np.asarray(sums[2][key][i, j]).ravel()
        cv = np.sqrt(np.maximum(n * s2 / np.maximum(s1, 1e-300) ** 2 - 1, 0))
        found += [(*key, int(a), int(b), float(c), int(k)) for a, b, c, k in zip(i, j, cv, steps.data[keep],
                                                                                  strict=True)]
    return sorted(found, key=lambda s: -s[4])[:top]


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


def mean_and_error(rates: list, key) -> tuple:
    """The mean of ``rates[k][key]`` over the texts and the squared standard error of that mean (sparse)."""
    n = len(rates)
    mean = sum(r[key] for r in rates) / n
    square = sum(r[key].power(2) for r in rates) / n
    variance = (square - mean.power(2)) * (n / (n - 1) if n > 1 else 1.0)  # the sample variance
    return mean.tocsr(), (variance / n).tocsr()


DAMPING = 0.1  # of the mean concept rate, added to the standard error: a synapse seen once is not "certain"


def separation(on: list, off: list, key) -> tuple:
    """(score, gain) of every synapse at ``key``: gain = mean rate on concept texts minus on other texts, score =
    gain / (its standard error + ``DAMPING`` x the mean non-zero concept rate), a damped Welch t statistic."""
    (m_on, e_on), (m_off, e_off) = mean_and_error(on, key), mean_and_error(off, key)
    gain = (m_on - m_off).tocsr()
    gain.eliminate_zeros()
    pattern = gain.copy()
    pattern.data[:] = 1
    damping = DAMPING * (m_on.data.mean() if m_on.nnz else 1.0)
    error = (e_on + e_off).tocsr()
    error.data = np.sqrt(np.maximum(error.data, 0))
    denominator = (error.multiply(pattern) + damping * pattern).tocsr()
    denominator.data = 1 / denominator.data
    return gain.multiply(denominator).tocsr(), gain


MIN_HELD_OUT = 10  # held-out texts per side below which an AUC is flagged as too few to mean much
BOOTSTRAP = 2000


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive > a random negative), ties counting half: 1 = perfectly selective, 0.5 = chance."""
    diff = np.asarray(positive)[:, None] - np.asarray(negative)[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def auc_interval(positive, negative, level: float = 0.95, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple:
    """A percentile bootstrap interval of ``auc``: positives and negatives resampled apart, ``n_boot`` times."""
    rng = np.random.default_rng(seed)
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    pos = positive[rng.integers(0, len(positive), (n_boot, len(positive)))]
    neg = negative[rng.integers(0, len(negative), (n_boot, len(negative)))]
    diff = pos[:, :, None] - neg[:, None, :]
    aucs = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))
    low, high = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def selectivity(positive, negative) -> dict:
    """The held-out AUC with its 95% bootstrap interval, the sample sizes and, when they are small, a warning."""
    low, high = auc_interval(positive, negative)
    n_pos, n_neg = len(positive), len(negative)
    warning = None
    if min(n_pos, n_neg) < MIN_HELD_OUT:
        warning = (f"only {n_pos} vs {n_neg} held-out texts (fewer than {MIN_HELD_OUT} a side): "
                   "too few for the selectivity to mean much")
    return {"selectivity": auc(positive, negative), "selectivity_ci": [low, high], "n_held_out_concept": n_pos,
            "n_held_out_other": n_neg, "warning": warning}


def synapse_rates(model, texts, synapses, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
    """(n_texts, n_synapses): each synapse's strength after each text, per byte of the text."""
    return np.array([synapse_series(model, text, synapses, chunk_size, False)[:, -1] / len(as_bytes(text))
                     for text in texts])


def held_out_scores(model, synapses, concept, other, chunk_size: int = CHUNK_SIZE) -> list:
    """Per synapse: its ``selectivity`` fields on held-out concept vs other texts and its mean rates on each."""
    on, off = (synapse_rates(model, texts, synapses, chunk_size) for texts in (concept, other))
    return [{**selectivity(on[:, s], off[:, s]), "held_out_concept": float(on[:, s].mean()),
             "held_out_other": float(off[:, s].mean())} for s in range(len(synapses))]


def growth_contexts(model, texts, synapse, n_contexts: int, context: int, chunk_size: int) -> list:
    """The bytes of ``texts`` where ``synapse`` grew most, as snippets that stay inside their own text."""
    found = []
    for t, text in enumerate(texts):
        data = as_bytes(text)
        growth = np.diff(synapse_series(model, data, [synapse], chunk_size, False)[0], prepend=0)
        found += [(g, t, o) for o, g in enumerate(growth) if g > 0]
    found = sorted(found, key=lambda f: -f[0])[:n_contexts]
    return [render_snippet(windows(as_bytes(texts[t]), np.array([o]), context)[0]) for _, t, o in found]


def concept_synapses(model, concept, other, held_out_concept, held_out_other, top: int = 10, layers=None,
                     n_contexts: int = 3, context: int = 24, chunk_size: int = CHUNK_SIZE,
                     progress: bool = True) -> list:
    """Synapses that grow most on texts about a concept, scored on held-out texts (the monosemantic-synapse test).

    A synapse's rate on a text is its strength after the text per byte. Ranked by ``score``, how clearly its
    rate is higher on ``concept`` than on ``other`` texts (``separation``: a damped Welch t statistic); each result
    has ``layer, head, i, j``, ``score``, ``gain`` (the difference of the mean rates), the ``selectivity`` fields
    (AUC of held-out concept vs held-out other rates: 1 = always higher on the concept, with its bootstrap
    interval, sample sizes and ``warning``),
    ``held_out_concept`` / ``held_out_other`` (mean rates) and ``contexts``: the concept bytes where it grew most.
    """
    for name, texts in (("concept", concept), ("other", other), ("held-out concept", held_out_concept),
                        ("held-out other", held_out_other)):
        if not texts:
            raise InterpretError(f"no {name} texts given")
    layers = synapse_layers(model.config, layers)
    run = dict(layers=layers, chunk_size=chunk_size, progress=progress)
    on, off = per_byte_rates(model, concept, **run), per_byte_rates(model, other, **run)
    separated = {key: separation(on, off, key) for key in on[0]}
    chosen = strongest_synapses({key: score for key, (score, _) in separated.items()}, top)
    scored = held_out_scores(model, [s[:4] for s in chosen], held_out_concept, held_out_other, chunk_size)
    results = []
    for (layer, head, i, j, score), held in zip(chosen, scored, strict=True):
        results.append({"layer": layer, "head": head, "i": i, "j": j, "score": score,
                        "gain": float(separated[layer, head][1][i, j]), **held,
                        "contexts": growth_contexts(model, concept, (layer, head, i, j), n_contexts, context,
                                                    chunk_size)})
    return results
