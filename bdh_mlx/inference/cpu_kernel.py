"""The one-token decoding step of a layer as a CPU kernel: numpy's BLAS reading MLX's own buffers.

On the CPU, MLX computes a one-row product as a general matrix product (``gemm`` with one row), which
reads a matrix at about 60% of the speed of the matrix-vector call (``gemv``) that numpy makes, and each
MLX operation costs more than a numpy one. A decoding step is a chain of such products, so on the CPU it
runs here: numpy reads the weights and the state through zero-copy views of the MLX arrays (evaluated
first; nothing is written through them), and the writes stay MLX operations on ``LayerState``'s kept
writes, so the cache is the same as the MLX step's. It is sparse-aware per head: where a head's x
fires on few RoPE pairs, S is read at those pairs' rows only, and encoder_v and the decoder at the
firing neurons' rows only (``engines.MLXSparse`` does the same with MLX operations on other devices).
"""

import threading

import mlx.core as mx
import numpy as np

from bdh_mlx.model import LN_EPS
from bdh_mlx.modeling.cache import LayerState


def layer_norm(z):
    """As ``model.layer_norm``: over the last axis, no weight and no bias."""
    centred = z - z.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + LN_EPS)


def rope(x, cos, sin):
    """R_t(x) = x cos + rot(x) sin, where rot(x)[2i] = -x[2i+1] and rot(x)[2i+1] = x[2i]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return x * cos + np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape) * sin


def rows_times(rows, matrix):
    """``rows (B, N) @ matrix (N, D)`` for a long N and a short D: numpy's own loops for one row (measured
    about 2x faster than its BLAS for this shape), the BLAS for more (the matrix is then read once)."""
    return np.einsum("bn,nd->bd", rows, matrix) if rows.shape[0] == 1 else rows @ matrix


def sparse_heads(firing_pairs, max_density: float):
    """(nh,) booleans: the heads where at most ``max_density`` of the pairs fire, in every batch row."""
    return (firing_pairs.sum(axis=-1) <= max_density * firing_pairs.shape[-1]).all(axis=-1)


_buffers = threading.local()


def take_rows(matrix, rows, name):
    """``matrix[rows]`` into a buffer kept for ``name`` by this thread (valid until its next call): fresh
    memory for each token's rows is paged in each time (measured at 25m: gathers 2.5x slower)."""
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.shape[0] < len(rows) or buffer.shape[1:] != matrix.shape[1:]:
        buffer = np.empty((max(len(rows), len(matrix) // 4), *matrix.shape[1:]), dtype=matrix.dtype)
        setattr(_buffers, name, buffer)
    return np.take(matrix, rows, axis=0, out=buffer[: len(rows)], mode="clip")  # "raise" would copy first


def layer_step(v, encoder, encoder_v, decoder, cos, sin, state: LayerState, max_density, encoder_v_rows):
    """``engines.MLXSparse.layer`` in numpy: ``(the layer's output, state)`` for one token of every batch row.

    A head runs sparse when, in every batch row, at most ``max_density`` of its RoPE pairs fire; then
    ``encoder_v_rows()`` (encoder_v as (nh, N, D)) gives the neurons' rows of encoder_v.
    """
    state = state.with_room()  # full only as MLX's step leaves it: this step adds its writes on the way out
    S, Q, V, _ = state
    mx.eval(v, encoder, encoder_v, decoder, cos, sin, S, Q, V)
    nh, D, N = encoder.shape
    B = S.shape[0]
    values = np.asarray(v).reshape(B, D)
    x = np.maximum(values @ np.asarray(encoder), 0)  # (nh, B, N)
    q = rope(x, np.asarray(cos).reshape(B, N), np.asarray(sin).reshape(B, N))
    q_rows = q.transpose(1, 0, 2)[:, :, None]  # (B, nh, 1, N)
    kept = ((q_rows @ np.asarray(Q).swapaxes(-1, -2)) @ np.asarray(V))[:, :, 0]  # (B, nh, D); V's row m is zero
    firing_pairs = (x[..., 0::2] + x[..., 1::2]) > 0  # (nh, B, N / 2); x >= 0
    sparse = sparse_heads(firing_pairs, max_density)

    states, weights, by_head = np.asarray(S), np.asarray(encoder_v), np.asarray(decoder).reshape(nh, N, D)
    columns = np.asarray(encoder_v_rows()) if sparse.any() else None  # (nh, N, D)
    read = np.empty((B, nh, D), dtype=np.float32)
    for h in range(nh):  # the attention read
        if sparse[h]:
            for b in range(B):
                pairs = np.flatnonzero(firing_pairs[h, b])  # rows 2p and 2p + 1, side by side in S
                rows = take_rows(states[b, h].reshape(N // 2, 2 * D), pairs, "pairs").reshape(-1, D)
                read[b, h] = q[h, b].reshape(-1, 2)[pairs].reshape(-1) @ rows
        else:
            read[:, h] = np.einsum("bn,bnd->bd", q[h], states[:, h])
    a = layer_norm(read + kept)
    u = np.zeros((B, D), dtype=np.float32)
    for h in range(nh):  # y and the decoder
        if sparse[h]:
            for b in range(B):
                neurons = np.flatnonzero(x[h, b])
                y = np.maximum(take_rows(columns[h], neurons, "encoder_v") @ a[b, h], 0)
                u[b] += (x[h, b, neurons] * y) @ take_rows(by_head[h], neurons, "decoder")
        else:
            y = np.maximum(a[:, h] @ weights[h], 0)  # (B, N)
            u += rows_times(x[h] * y, by_head[h])
    del states, weights, by_head, columns  # the views hold their arrays: let go before MLX writes in place

    del S, Q, V
    # When the kept writes are full they are added to S lazily, so S is written in place once the cache lets go.
    output = layer_norm(values + layer_norm(u))  # model.residual
    return mx.array(output).reshape(B, 1, 1, D), state.kept(mx.array(q_rows), v.astype(mx.float32)).with_room()
