"""Neuron graphs G_x = D_x E and G_y = D_y E per head, sparse: degrees, a power-law fit and modularity.

Here D_x is head h's encoder (D, N) read as N x D, D_y its encoder_v, and E its decoder rows (N, D) read as D x N:
``G[i, j] = sum_d encoder[h, d, i] * decoder[h * N + j, d]``, how strongly neuron j's output excites neuron i
through the residual stream. Rows are computed in blocks and only the positive entries above ``threshold``, or
the ``top_k`` largest per row, are kept: never the dense N x N.
"""

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize_scalar
from scipy.special import zeta

from .common import InterpretError, check_kind, check_neuron

ENCODERS = {"x": "encoder", "y": "encoder_v"}


def neuron_graph(model, head: int, kind: str = "x", top_k: int | None = 16, threshold: float | None = None,
                 block: int = 1024) -> sp.csr_matrix:
    """Head ``head``'s G_x (kind "x") or G_y (kind "y") as a sparse (N, N) matrix without self-loops.

    Keeps the entries > ``threshold`` (default 0) in each row, and of those at most the ``top_k`` largest.
    """
    check_kind(kind)
    check_neuron(model.config, 0, head)
    if top_k is None and threshold is None:
        raise InterpretError("give top_k or threshold: a dense N x N graph is not kept")
    if top_k is not None and top_k < 1:
        raise InterpretError(f"top_k must be at least 1, got {top_k}")
    N = model.config.n_neurons
    encoder = np.array(getattr(model, ENCODERS[kind])[head]).astype(np.float32)  # (D, N)
    decoder = np.array(model.decoder[head * N : (head + 1) * N]).astype(np.float32)  # (N, D)
    rows, cols, vals = [], [], []
    for start in range(0, N, block):
        g = encoder[:, start : start + block].T @ decoder.T  # (b, N)
        g[np.arange(len(g)), start + np.arange(len(g))] = 0  # no self-loops
        g[g <= (threshold or 0.0)] = 0
        if top_k is not None and top_k < N:
            smallest = np.argpartition(-g, top_k, axis=1)[:, top_k:]
            np.put_along_axis(g, smallest, 0, axis=1)
        r, c = np.nonzero(g)
        rows.append(r + start), cols.append(c), vals.append(g[r, c])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, N))


def undirected(graph: sp.spmatrix) -> sp.csr_matrix:
    """The graph with each edge both ways, weights summed where both directions exist."""
    return (graph + graph.T).tocsr()


def degrees(graph: sp.spmatrix) -> np.ndarray:
    """Each neuron's number of neighbours, edges taken in either direction."""
    return np.diff(undirected(graph).indptr)


def power_law_fit(degrees: np.ndarray, min_tail: int = 10) -> dict | None:
    """The exponent alpha of P(d) ~ d^-alpha for d >= d_min: the discrete maximum-likelihood fit (Hurwitz zeta
    normalisation), with d_min the one minimising the Kolmogorov-Smirnov distance ``ks`` (Clauset et al. 2009).
    None: fewer than ``min_tail`` degrees or too few distinct values to fit (e.g. a regular graph)."""
    d = degrees[degrees > 0].astype(np.float64)
    best = None
    for d_min in np.unique(d):
        tail = d[d >= d_min]
        values = np.unique(tail)
        if len(tail) < min_tail or len(values) < 2:
            break
        log_sum = np.log(tail).sum()
        alpha = minimize_scalar(lambda a: a * log_sum + len(tail) * np.log(zeta(a, d_min)),  # noqa: B023
                                bounds=(1.0001, 10.0), method="bounded").x
        below = np.searchsorted(np.sort(tail), values) / len(tail)  # empirical P(D < value)
        ks = float(np.abs(below - (1 - zeta(alpha, values) / zeta(alpha, d_min))).max())
        if best is None or ks < best["ks"]:
            best = {"alpha": float(alpha), "d_min": int(d_min), "n_tail": len(tail), "ks": ks}
    return best


def modularity(graph: sp.spmatrix, seed: int = 0) -> dict:
    """Louvain communities of the undirected weighted graph (networkx) and their modularity Q (None: no edges)."""
    if graph.nnz == 0:
        return {"modularity": None, "n_communities": graph.shape[0], "largest_communities": [1]}
    g = nx.from_scipy_sparse_array(undirected(graph))
    communities = nx.community.louvain_communities(g, weight="weight", seed=seed)
    sizes = sorted((len(c) for c in communities), reverse=True)
    return {"modularity": float(nx.community.modularity(g, communities, weight="weight")),
            "n_communities": len(communities), "largest_communities": sizes[:10]}


def graph_summary(model, kind: str = "x", top_k: int | None = 16, threshold: float | None = None,
                  heads=None) -> list:
    """Per head: edges, mean and max degree, the power-law fit and the modularity; plus the degrees themselves."""
    heads = range(model.config.n_head) if heads is None else heads
    out = []
    for head in heads:
        g = neuron_graph(model, head, kind, top_k, threshold)
        deg = degrees(g)
        out.append({"kind": kind, "head": int(head), "edges": int(g.nnz), "mean_degree": float(deg.mean()),
                    "max_degree": int(deg.max()), "power_law": power_law_fit(deg), **modularity(g), "degrees": deg})
    return out
