"""Decoding engines: the one-token layer through the recurrent state, fast, chosen once per model.

Each engine computes what the model's own ``BDH.layer`` computes for one token through a cache (the step
form of attention, then y, the decoder and the residual), and leaves the same cache:

    engine       where                            how
    MLXDense     any device (quantized weights)   MLX operations, every neuron
    MLXSparse    GPU / other devices              MLX operations; where few RoPE pairs fire, S, encoder_v
                                                  and the decoder are read at the firing neurons' rows only
    CPUKernel    the CPU, float32 weights         numpy's BLAS on zero-copy views of MLX's buffers
                                                  (``cpu_kernel.py``), sparse-aware per head

``choose_engine`` picks one from the device, the compute dtype and the weight format; ``bdh_mlx.load`` and
``quantize`` call it, and ``BDH(config, engine=...)`` takes one.
"""

import ctypes

import mlx.core as mx

from bdh_mlx.inference import cpu_kernel
from bdh_mlx.model import fire, layer_norm, matmul, recurrent_attention_step, relu, residual, rope
from bdh_mlx.modeling.cache import LayerState, take_rows

# Above this fraction of firing RoPE pairs the dense step is faster. Measured at 25m (generate_speed.py
# --densities), sparse / dense time with MLX's steps: 0.40 at 5% of pairs firing, 0.53 at 10%, 0.80 at 19%,
# 1.07 at 27%; with the CPU kernel's: 0.62 at 10%, 0.99 at 19%, 0.93 at 27%, 1.07 at 36%.
SPARSE_STEP_DENSITY = 0.2


def firing_rows(x, max_density: float):
    """Where one token's x fires, per batch row and head: ``(rows, neurons)``, each (B, nh, R), or None.

    ``rows``: the neurons of the RoPE pairs (2i, 2i+1) with an entry of x non-zero; qr = R_t(x) is zero on
    the other pairs, so only these rows of S are read. ``neurons``: those with x non-zero, the only ones
    where x y can be. Heads with fewer are padded with silent ones (their terms are zero) to a multiple of
    32, so that arrays come in a few sizes only, which MLX's allocator reuses (a new size each token costs
    fresh memory pages: measured 1.5x slower at 25m). None when more than ``max_density`` of the pairs
    fire somewhere: the dense step is then faster.
    """
    pairs = mx.maximum(x[..., 0, 0::2], x[..., 0, 1::2]) > 0  # (B, nh, N / 2); x >= 0
    fired = x[..., 0, :] > 0
    n_pairs, n_neurons = mx.stack([pairs.sum(axis=-1).max(), fired.sum(axis=-1).max()]).tolist()
    if n_pairs > max_density * pairs.shape[-1]:
        return None

    def first(k, firing):  # indices of the firing entries first, k of them
        k = min(max(-(-k // 32) * 32, 1), firing.shape[-1])
        return mx.argpartition((~firing).astype(mx.uint8), kth=k - 1, axis=-1)[..., :k]

    pair = first(n_pairs, pairs)
    rows = mx.stack([2 * pair, 2 * pair + 1], axis=-1).reshape(*pair.shape[:2], -1)
    return rows, first(n_neurons, fired)


def data_address(a) -> int:
    """Where the data of ``a`` is in memory (evaluates it)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(a)))


class DerivedWeight:
    """An array made from a weight (``value``), valid while the weight's data is where it was then.

    ``source`` is a view of the weight: it shares its buffer, so an in-place edit of the weight
    (``model.encoder_v[..., j] = 0``, ``+=``) cannot write into that buffer and moves the weight's data;
    a replaced weight has other data too. Held by the engine, outside ``model.state``: neither saved
    nor traced by the training step.
    """

    def __init__(self):
        self.source = self.value = None

    def get(self, weight, make, dtype):
        """``make(weight)`` in ``dtype``, made again only when ``weight``'s data has moved (or for another dtype)."""
        if self.source is None or data_address(self.source) != data_address(weight) or self.value.dtype != dtype:
            self.source, self.value = None, None  # let go of the old ones first
            self.source = weight.reshape(-1)
            self.value = make(weight).astype(dtype)
            mx.eval(self.source, self.value)
        return self.value


class MLXDense:
    """The one-token layer with MLX operations, reading every neuron."""

    name = "mlx-dense"
    max_density = 0.0

    def layer(self, v, weights, cos, sin, state: LayerState, encoder_v_source):
        """``(the layer's output, state)`` for one token of every batch row: v (B, 1, 1, D).

        ``weights``: encoder, encoder_v, decoder in the compute dtype; ``encoder_v_source``: the model's own
        encoder_v (the sparse engines keep a copy of it by rows).
        """
        encoder, encoder_v, decoder = weights
        x = relu(matmul(v, encoder))  # (B, nh, 1, N)
        firing = firing_rows(x, self.max_density) if self.max_density > 0 else None
        read, state = recurrent_attention_step(rope(x, cos, sin), v, state, None if firing is None else firing[0])
        a = layer_norm(read)
        if firing is None:
            return residual(v, fire(x, a, encoder_v, decoder)[0]), state
        rows = self.encoder_v_rows(encoder_v_source, encoder.dtype)
        nh, N, D = rows.shape
        neurons = firing[1]
        x = mx.take_along_axis(x, neurons[..., None, :], axis=-1)  # (B, nh, 1, R)
        weights = take_rows(rows, neurons).swapaxes(-1, -2), take_rows(decoder.reshape(nh, N, D), neurons)
        return residual(v, fire(x, a, *weights)[0]), state


class MLXSparse(MLXDense):
    """``MLXDense``, reading S, encoder_v and the decoder at the firing neurons' rows only when at most
    ``max_density`` of the RoPE pairs fire (the same sums without their zero terms)."""

    name = "mlx-sparse"

    def __init__(self, max_density: float = SPARSE_STEP_DENSITY):
        self.max_density = max_density
        self.rows = DerivedWeight()

    def encoder_v_rows(self, encoder_v, dtype):
        """encoder_v as (nh, N, D), each neuron's column a contiguous row: made the first time a token fires
        sparsely (a dense model never holds it), kept, and made again when encoder_v changes (replaced, or
        edited in place)."""
        return self.rows.get(encoder_v, lambda w: mx.contiguous(w.swapaxes(-1, -2)), dtype)


class CPUKernel(MLXSparse):
    """The one-token layer in numpy on the CPU (``cpu_kernel.layer_step``), for float32 weights."""

    name = "cpu-kernel"

    def layer(self, v, weights, cos, sin, state: LayerState, encoder_v_source):
        rows = lambda: self.encoder_v_rows(encoder_v_source, mx.float32)  # noqa: E731
        return cpu_kernel.layer_step(v, *weights, cos, sin, state, self.max_density, rows)


def choose_engine(config, compute_dtype=mx.float32, device=None):
    """The fastest engine for a model of ``config`` computing in ``compute_dtype`` on ``device`` (default: MLX's)."""
    if config.quantization is not None:
        return MLXDense()
    if (device or mx.default_device()) == mx.cpu and compute_dtype == mx.float32:
        return CPUKernel()
    return MLXSparse()
