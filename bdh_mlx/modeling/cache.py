"""The recurrent state that replaces a KV cache: one (B, nh, N, D) matrix per layer."""

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from bdh_mlx.errors import CheckpointError
from bdh_mlx.storage.files import NpzReader, atomic_savez

_OFFSET_KEY = "offset"
KEPT_WRITES = 16  # writes kept aside while decoding before they are added to S: see LayerState.read_then_write


class LayerState(NamedTuple):
    """One layer's attention state while decoding: ``S``, with the last ``m`` writes kept aside.

    The whole state is ``S + Q^T V``: Q (B, nh, K, N) holds the rotated queries of the kept writes and
    V (B, 1, K, D) their values, rows ``m`` and on of V being zero (see ``recurrent_attention_step``).
    """

    S: mx.array  # (B, nh, N, D), float32
    Q: mx.array | None = None
    V: mx.array | None = None
    m: int = 0

    def whole(self) -> mx.array:
        """S with the kept writes added: one rank-K BLAS update, in place when nothing else holds S."""
        if self.m == 0:
            return self.S
        return mx.addmm(self.S, self.Q.swapaxes(-1, -2), mx.broadcast_to(self.V, (*self.Q.shape[:3], self.V.shape[-1])))

    def with_room(self) -> "LayerState":
        """This state with a free row for the next write: the buffers made at the first token, and the kept
        writes added to S (``whole``) when all ``KEPT_WRITES`` rows are taken. Q's rows are overwritten before
        they are read again; V's must be zero."""
        if self.Q is None:
            B, nh, N, D = self.S.shape
            return LayerState(self.S, mx.zeros((B, nh, KEPT_WRITES, N)), mx.zeros((B, 1, KEPT_WRITES, D)), 0)
        if self.m == KEPT_WRITES:
            return LayerState(self.whole(), self.Q, mx.zeros_like(self.V), 0)
        return self

    def read_then_write(self, q, v, rows=None) -> tuple:
        """``(q (S + Q^T V), this state + outer(q, v))`` for one token: q (B, nh, 1, N), v (B, 1, 1, D), float32.

        The whole state is read before the write (the token itself is excluded). Memory-bound, so the write
        is kept aside (``kept``) and the read is q S + (q Q^T) V: per token S is read once, and read and
        written once per ``KEPT_WRITES`` tokens, where a rank-1 update would read it three times and write
        it once. ``rows`` (B, nh, R): read S only at these rows, where q is non-zero.
        """
        state = self.with_room()
        written = state.kept(q, v)  # Q written first: the old Q has no other user (in place)
        out = (q @ written.Q.swapaxes(-1, -2)) @ state.V  # V before the write: its row m is zero
        if rows is None:
            return out + q @ state.S, written
        return out + mx.take_along_axis(q, rows[..., None, :], axis=-1) @ take_rows(state.S, rows), written

    def kept(self, q, v) -> "LayerState":
        """With one more write kept in row ``m``: q (B, nh, 1, N), v (B, 1, 1, D), float32. In place when
        nothing else holds Q and V."""
        at = mx.array([self.m])
        return LayerState(self.S, mx.slice_update(self.Q, q, at, axes=(2,)), mx.slice_update(self.V, v, at, axes=(2,)),
                          self.m + 1)


def take_rows(matrix, rows):
    """``matrix[b, h, rows[b, h]]`` as (B, nh, R, D): of a state (B, nh, N, D), or of weights (nh, N, D).

    One ``take`` of whole rows from the matrix seen as 2-D: contiguous copies (a ``take_along_axis`` of the
    same rows runs about 10x slower on CPU).
    """
    B, nh, R = rows.shape
    *_, N, D = matrix.shape
    batch = mx.arange(B)[:, None, None] if matrix.ndim == 4 else 0
    flat = (batch * nh + mx.arange(nh)[None, :, None]) * N + rows
    return mx.take(matrix.reshape(-1, D), flat.reshape(-1), axis=0).reshape(B, nh, R, D)


class BDHCache:
    """Per-layer attention states ``S`` in float32, and how many tokens each row has seen.

    Its size does not grow with the text: ``n_layer * B * nh * N * D`` floats (and, while decoding, a few
    kept writes per layer: ``layers``). ``states`` is always the whole state.
    MLX arrays are immutable, so ``copy()`` is cheap and branches never interfere.
    """

    def __init__(self, states: list, offset: mx.array):
        self.layers = [LayerState(s) for s in states]
        self.offset = offset

    @classmethod
    def empty(cls, batch_size, n_layer, n_head, n_neurons, n_embd):
        state = mx.zeros((batch_size, n_head, n_neurons, n_embd), dtype=mx.float32)
        return cls([state] * n_layer, mx.zeros((batch_size,), dtype=mx.int32))

    @property
    def states(self) -> list:
        """Each layer's whole state S (B, nh, N, D), the kept writes added in (the cache is unchanged)."""
        return [layer.whole() for layer in self.layers]

    @states.setter
    def states(self, states: list):
        self.layers = [LayerState(s) for s in states]

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    @property
    def nbytes(self) -> int:
        kept = sum(a.nbytes for layer in self.layers for a in (layer.Q, layer.V) if a is not None)
        return sum(layer.S.nbytes for layer in self.layers) + kept + self.offset.nbytes

    @property
    def state(self) -> list:
        """Everything the cache holds, as arrays (for ``mx.eval``)."""
        return [a for layer in self.layers for a in layer[:3] if a is not None] + [self.offset]

    def copy(self) -> "BDHCache":
        """An independent cache at the same point (to branch a continuation)."""
        other = BDHCache([], self.offset)
        other.layers = list(self.layers)
        return other

    @classmethod
    def stack(cls, caches: list) -> "BDHCache":
        """Join caches of single rows (or batches) into one batch, row after row."""
        n_layer = len(caches[0].states)
        states = [mx.concatenate([c.states[i] for c in caches], axis=0) for i in range(n_layer)]
        return cls(states, mx.concatenate([c.offset for c in caches], axis=0))

    def save(self, path):
        """Write the cache as one ``.npz`` (prompt caching), atomically."""
        arrays = {f"state_{i}": np.array(s) for i, s in enumerate(self.states)}
        arrays[_OFFSET_KEY] = np.array(self.offset)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path, config=None, batch_size=None) -> "BDHCache":
        """Read a cache saved by ``save``; with ``config``, check that it fits that model, with ``batch_size``,
        that it holds that many rows. Every state must be finite.

        Names, shapes and dtypes are checked from the ``.npy`` headers before any state is inflated.
        """
        path = Path(path)
        with NpzReader(path, "cache file") as npz:
            n_layer = sum(name.startswith("state_") for name in npz.names)
            names = [f"state_{i}" for i in range(n_layer)] + [_OFFSET_KEY]
            if n_layer == 0 or set(names) != set(npz.names):
                raise CheckpointError(f"{path}: not a bdh-mlx cache (entries state_0 ... state_<n-1> and offset)")
            headers = {name: npz.header(name) for name in names}
            shape = headers["state_0"].shape
            if len(shape) != 4 or any(headers[name].shape != shape for name in names[:-1]):
                raise CheckpointError(f"{path}: the states are not all of one (B, n_head, N, D) shape")
            if headers[_OFFSET_KEY].shape != shape[:1]:
                raise CheckpointError(f"{path}: offset has shape {headers[_OFFSET_KEY].shape}, expected {shape[:1]}")
            if shape[0] == 0:
                raise CheckpointError(f"{path}: the cache holds no rows (texts)")
            if batch_size is not None and shape[0] != batch_size:
                raise CheckpointError(f"{path}: the cache holds {shape[0]} rows (texts), not the {batch_size} "
                                      f"continued here")
            if config is not None:
                want = (config.n_head, config.n_neurons, config.n_embd)
                if n_layer != config.n_layer or shape[1:] != want:
                    raise CheckpointError(
                        f"{path}: cache of {n_layer} layers of {shape[1:]} does not fit the model "
                        f"({config.n_layer} layers of {want})"
                    )
            states = [npz.read(name, kinds="f").astype(np.float32, copy=False) for name in names[:-1]]
            offset = npz.read(_OFFSET_KEY, kinds="iu")
        bad = next((i for i, state in enumerate(states) if not np.isfinite(state).all()), None)
        if bad is not None:
            raise CheckpointError(f"{path}: state_{bad} holds NaN or infinite values (a damaged cache)")
        if not ((offset >= 0) & (offset < 2**31)).all():
            raise CheckpointError(f"{path}: offset holds positions outside [0, 2**31)")
        return cls([mx.array(state) for state in states], mx.array(offset.astype(np.int32)))
