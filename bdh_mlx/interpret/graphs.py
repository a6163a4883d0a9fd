"""Neuron graphs G_x = D_x E and G_y = D_y E per head, sparse: degrees, a power-law fit, modularity, baselines.

Here D_x is head h's encoder (D, N) read as N x D, D_y its encoder_v, and E its decoder rows (N, D) read as D x N:
``G[i, j] = sum_d encoder[h, d, i] * decoder[h * N + j, d]``, how strongly neuron j's output excites neuron i
through the residual stream. Rows are computed in blocks and only some positive entries are kept (never the dense
N x N): the largest ``edges`` of the whole matrix (no bound on any neuron's degree), the ``top_k`` largest per row
(every neuron keeps k out-edges, so no degree is below k), or those above a ``threshold``.
"""

import warnings

import networkx as nx
import numpy as np
import scipy.sparse as sp

from .common import InterpretError, check_kind, check_neuron

ENCODERS = {"x": "encoder", "y": "encoder_v"}
ALPHA_RANGE = (1.0, 10.0)  # the exponents the power-law fit may return; one at a bound is no estimate
ALTERNATIVES = ("lognormal", "exponential")


def initial_model(config, seed: int = 0):
    """A model of ``config`` as ``train`` initializes it with ``seed``: the untrained baseline of a trained one."""
    import mlx.core as mx

    from bdh_mlx.model import BDH

    mx.random.seed(seed)
    return BDH(config)


def head_weights(model, head: int, kind: str) -> tuple:
    """The head's encoder (D, N) and decoder rows (N, D) as float32 numpy, from a float or a quantized model
    (whose weights are stored transposed: see ``bdh_mlx.modeling.quantized``)."""
    N = model.config.n_neurons
    encoder, decoder = getattr(model, ENCODERS[kind]), model.decoder
    if hasattr(encoder, "dequantize"):
        return (np.array(encoder.dequantize(head)).T.astype(np.float32),
                np.array(decoder.dequantize(head)).T.astype(np.float32))
    return np.array(encoder[head]).astype(np.float32), np.array(decoder[head * N : (head + 1) * N]).astype(np.float32)


def graph_blocks(model, head: int, kind: str, block: int = 1024):
    """Yield ``(start, g)``: rows start .. start + len(g) of the head's dense G, self-loops set to 0."""
    N = model.config.n_neurons
    encoder, decoder = head_weights(model, head, kind)  # (D, N), (N, D)
    for start in range(0, N, block):
        g = encoder[:, start : start + block].T @ decoder.T  # (b, N)
        g[np.arange(len(g)), start + np.arange(len(g))] = 0
        yield start, g


def global_threshold(model, head: int, kind: str, edges: int) -> float:
    """The value of the ``edges``-th largest positive entry of G (0 when fewer are positive)."""
    candidates = []
    for _, g in graph_blocks(model, head, kind):
        flat = g[g > 0]
        candidates.append(flat if len(flat) <= edges else np.partition(flat, len(flat) - edges)[-edges:])
    flat = np.concatenate(candidates)
    return 0.0 if len(flat) < edges else float(np.partition(flat, len(flat) - edges)[len(flat) - edges])


def neuron_graph(model, head: int, kind: str = "x", top_k: int | None = None, threshold: float | None = None,
                 edges: int | None = None) -> sp.csr_matrix:
    """Head ``head``'s G_x (kind "x") or G_y (kind "y") as a sparse (N, N) matrix of positive entries, no self-loops.

    Exactly one of: ``edges`` (the largest entries of the whole matrix, ties at the cut kept), ``top_k`` (the
    largest per row) or ``threshold`` (every entry above it).
    """
    check_kind(kind)
    check_neuron(model.config, 0, head)
    if sum(v is not None for v in (top_k, threshold, edges)) != 1:
        raise InterpretError("give one of edges, top_k or threshold: a dense N x N graph is not kept")
    for name, value in (("top_k", top_k), ("edges", edges)):
        if value is not None and value < 1:
            raise InterpretError(f"{name} must be at least 1, got {value}")
    N = model.config.n_neurons
    if edges is not None:
        cut = global_threshold(model, head, kind, edges)
        threshold = np.nextafter(np.float32(cut), np.float32(-np.inf)) if cut > 0 else 0.0
    rows, cols, vals = [], [], []
    for start, g in graph_blocks(model, head, kind):
        g[g <= (threshold or 0.0)] = 0
        if top_k is not None and top_k < N:
            smallest = np.argpartition(-g, top_k, axis=1)[:, top_k:]
            np.put_along_axis(g, smallest, 0, axis=1)
        r, c = np.nonzero(g)
        rows.append(r + start), cols.append(c), vals.append(g[r, c])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, N))


def sparsification(top_k=None, threshold=None, edges=None) -> str:
    """How the graph was made sparse, and what that does to the degrees, in words."""
    if edges is not None:
        return (f"the {edges:,} largest positive entries of G per head (a global cut): no per-neuron bound, "
                "a neuron may have any degree, 0 included")
    if top_k is not None:
        return (f"the {top_k} largest positive entries of each row: every neuron keeps {top_k} out-edges, so no "
                f"degree is below {top_k} and the distribution's low end is set by the cut")
    return f"the entries above {threshold:g}: no per-neuron bound"


def undirected(graph: sp.spmatrix) -> sp.csr_matrix:
    """The graph with each edge both ways, weights summed where both directions exist."""
    return (graph + graph.T).tocsr()


def degrees(graph: sp.spmatrix) -> np.ndarray:
    """Each neuron's number of neighbours, edges taken in either direction."""
    return np.diff(undirected(graph).indptr)


def power_law_fit(degrees: np.ndarray, min_tail: int = 50) -> dict:
    """The discrete power law P(d) ~ d^-alpha for d >= d_min (the ``powerlaw`` package: maximum likelihood, d_min
    by Kolmogorov-Smirnov, Clauset et al. 2009), compared by log-likelihood ratio with its alternatives.

    Returns ``alpha`` (None when the fit stopped at a bound of ``ALPHA_RANGE`` or failed: ``note`` says why),
    ``d_min``, ``n_tail``, ``n`` (degrees > 0), ``ks`` and per alternative ``{"R": normalised ratio (> 0 favours
    the power law), "p": its significance}``. d_min is searched among the values that leave ``min_tail`` degrees
    or more in the tail.
    """
    import powerlaw

    d = np.asarray(degrees)[np.asarray(degrees) > 0]
    result = {"alpha": None, "d_min": None, "n_tail": 0, "n": int(len(d)), "ks": None, "note": None,
              "compare": {}}
    if len(d) < min_tail or len(np.unique(np.sort(d)[-min_tail:])) < 3:
        result["note"] = (f"too few distinct degrees to fit (fewer than 3 values among the {min_tail} largest of "
                          f"{len(d)})")
        return result
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(d, discrete=True, verbose=False, parameter_ranges={"alpha": list(ALPHA_RANGE)},
                           xmin=d_min_range(d, min_tail))
        alpha, d_min = float(fit.power_law.alpha), int(fit.xmin)
        result.update(d_min=d_min, n_tail=int((d >= d_min).sum()), ks=float(fit.power_law.D))
        result["compare"] = {alt: dict(zip(("R", "p"), map(float, fit.distribution_compare(
            "power_law", alt, normalized_ratio=True)), strict=True)) for alt in ALTERNATIVES}
    if fit.power_law.noise_flag or not np.isfinite(alpha):
        result["note"] = (f"the fit stopped at a bound of alpha in [{ALPHA_RANGE[0]:g}, {ALPHA_RANGE[1]:g}] "
                          f"(reached {alpha:.2f}): no estimate")
    else:
        result["alpha"] = alpha
    return result


def d_min_range(d: np.ndarray, min_tail: int):
    """powerlaw.Fit's ``xmin``: the degrees that leave ``min_tail`` in the tail, as the range it searches (it takes
    the values in [low, high) and drops the last), or the one value when only one qualifies."""
    values = np.unique(d)
    allowed = values[values <= np.sort(d)[-min_tail]]
    return float(allowed[0]) if len(allowed) == 1 else (float(allowed[0]), float(values[len(allowed)]) + 0.5)


def modularity(graph: sp.spmatrix, seed: int = 0, weighted: bool = True) -> dict:
    """Louvain communities of the undirected graph (networkx) and their modularity Q (None: no edges).

    ``weighted`` False: every edge counts 1 (for comparing with a degree-preserving shuffle, which has no weights).
    """
    return graph_modularity(nx.from_scipy_sparse_array(undirected(graph)), seed, "weight" if weighted else None)


def graph_modularity(g: nx.Graph, seed: int, weight) -> dict:
    if g.number_of_edges() == 0:
        return {"modularity": None, "n_communities": g.number_of_nodes(), "largest_communities": [1]}
    communities = nx.community.louvain_communities(g, weight=weight, seed=seed)
    sizes = sorted((len(c) for c in communities), reverse=True)
    return {"modularity": float(nx.community.modularity(g, communities, weight=weight)),
            "n_communities": len(communities), "largest_communities": sizes[:10]}


def degree_preserving_shuffle(graph: sp.spmatrix, seed: int = 0, swaps_per_edge: int = 5) -> nx.Graph:
    """The undirected, unweighted graph with its edges rewired by double-edge swaps (networkx): every neuron keeps
    its degree, any other structure (communities) is destroyed."""
    g = nx.from_scipy_sparse_array(undirected(graph))
    nx.set_edge_attributes(g, 1, "weight")
    n_edges = g.number_of_edges()
    if n_edges >= 2:
        nx.double_edge_swap(g, nswap=swaps_per_edge * n_edges, max_tries=100 * swaps_per_edge * n_edges, seed=seed)
    return g


def describe(n_edges: int, deg: np.ndarray, q: dict) -> dict:
    """Undirected edges, degrees, the power-law fit and the modularity of one graph."""
    return {"edges": int(n_edges), "mean_degree": float(deg.mean()), "max_degree": int(deg.max()),
            "power_law": power_law_fit(deg), **q, "degrees": deg}


def head_summary(model, head: int, kind: str, sparsify: dict, baselines=None, seed: int = 0) -> dict:
    """One head's graph; ``baselines``: ``{"init": model at initialization}`` adds that model's graph and
    ``"shuffle"`` a degree-preserving shuffle of this one (modularity unweighted in all three, to compare)."""
    g = neuron_graph(model, head, kind, **sparsify)
    out = {"kind": kind, "head": int(head), **describe(undirected(g).nnz // 2, degrees(g),
                                                               modularity(g, seed, weighted=False))}
    if baselines is None:
        return out
    init = neuron_graph(baselines["init"], head, kind, **sparsify)
    out["init"] = describe(undirected(init).nnz // 2, degrees(init), modularity(init, seed, weighted=False))
    shuffled = degree_preserving_shuffle(g, seed)
    deg = np.array([d for _, d in sorted(shuffled.degree())])
    out["shuffle"] = describe(shuffled.number_of_edges(), deg, graph_modularity(shuffled, seed, None))
    return out


def graph_summary(model, kind: str = "x", top_k: int | None = None, threshold: float | None = None,
                  edges: int | None = None, heads=None, init_model=None, seed: int = 0) -> list:
    """Per head: edges, mean and max degree, the power-law fit and the (unweighted) modularity, plus the degrees.

    Default sparsification: the 16 N largest entries of each head's G (mean out-degree 16, no per-neuron bound).
    ``init_model`` (the same configuration at initialization): adds the ``init`` and ``shuffle`` baselines.
    """
    if top_k is None and threshold is None and edges is None:
        edges = 16 * model.config.n_neurons
    sparsify = {"top_k": top_k, "threshold": threshold, "edges": edges}
    heads = range(model.config.n_head) if heads is None else heads
    baselines = None if init_model is None else {"init": init_model}
    return [{**head_summary(model, head, kind, sparsify, baselines, seed), "sparsified": sparsification(**sparsify)}
            for head in heads]
