"""Quantized weights with MLX's own kernels (``mx.quantize``, ``mx.quantized_matmul``), and ``bdh-mlx quantize``.

Each weight is stored as a matrix M quantized along its last axis in groups of ``group_size``
(affine: every group has a float scale and bias). A weight used as ``x @ W`` (W: ``(..., in, out)``)
is stored transposed, ``M = W^T``, so that ``mx.quantized_matmul(x, M, transpose=True)`` computes it:

    weight     float (official)   stored M           groups along
    encoder    (nh, D, N)         (nh, N, D)         D
    encoder_v  (nh, D, N)         (nh, N, D)         D
    decoder    (nh * N, D)        (nh, D, N)         N (each head's rows of the decoder)
    lm_head    (D, V)             (V, D)             D
    embed      (V, D)             (V, D)             D  (optional: a lookup, dequantized rows)

In a checkpoint each becomes ``NAME.weight_q`` (uint32, ``32 / bits`` values per word), ``NAME.scales`` and
``NAME.biases``; the config records ``quantization: {"bits", "group_size", "embedding"}``, so it stays
self-describing and is loaded strictly like a float one.

``quantize(model)`` and the command ``bdh-mlx quantize`` are in ``bdh_mlx.tools.quantize``.
"""


import mlx.core as mx
import mlx.nn as nn

from bdh_mlx.errors import ConfigError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
# MLX's CPU quantized_matmul costs about M times a one-row product (25m encoder, 4 heads: 15 ms at 1 row,
# 170 ms at 8, 10 s at 512), dequantize + float matmul about 110-150 ms whatever M: beyond 8 rows
# (B x T: prefill, evaluation) the weight is dequantized for the call (a transient float copy).
QUANTIZED_MATMUL_ROWS = 8


class QuantizedWeight(nn.Module):
    """A matrix M (``(..., rows, cols)``) quantized along ``cols``; ``self(x)`` is ``x @ M^T``."""

    def __init__(self, shape, group_size: int, bits: int):
        super().__init__()
        *batch, rows, cols = shape
        self.group_size, self.bits = group_size, bits
        self.weight_q = mx.zeros((*batch, rows, cols * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((*batch, rows, cols // group_size))
        self.biases = mx.zeros((*batch, rows, cols // group_size))
        self.freeze()

    @classmethod
    def from_matrix(cls, m, group_size: int, bits: int) -> "QuantizedWeight":
        q = cls(m.shape, group_size, bits)
        q.weight_q, q.scales, q.biases = mx.quantize(m.astype(mx.float32), group_size=group_size, bits=bits)
        return q

    def __call__(self, x):
        if x.shape[0] * x.shape[-2] > QUANTIZED_MATMUL_ROWS:  # many rows: dequantize once, then BLAS
            return x @ self.dequantize().astype(x.dtype).swapaxes(-1, -2)
        return mx.quantized_matmul(
            x, self.weight_q, self.scales.astype(x.dtype), self.biases.astype(x.dtype),
            transpose=True, group_size=self.group_size, bits=self.bits,
        )

    def dequantize(self, rows=None):
        """M in float32 (or only ``M[rows]``)."""
        arrays = [self.weight_q, self.scales, self.biases]
        if rows is not None:
            arrays = [a[rows] for a in arrays]
        return mx.dequantize(*arrays, group_size=self.group_size, bits=self.bits)


class QuantizedEmbedding(QuantizedWeight):
    """An embedding table (V, D) quantized along D: a lookup dequantizes the rows it needs."""

    def __call__(self, idx):
        return self.dequantize(idx)


def stored_shapes(config) -> dict:
    """Float shape of M (the stored, transposed matrix) for each quantized weight of ``config``."""
    D, nh, N, V = config.n_embd, config.n_head, config.n_neurons, config.vocab_size
    shapes = {"encoder": (nh, N, D), "encoder_v": (nh, N, D), "decoder": (nh, D, N), "lm_head": (V, D)}
    if config.quantization["embedding"]:
        shapes["embed"] = (V, D)
    return shapes


def quantized_weight_shapes(config) -> dict:
    """Checkpoint names and shapes of the quantized weights of ``config`` (``config.quantization`` set)."""
    q = config.quantization
    shapes = {}
    for name, (*batch, rows, cols) in stored_shapes(config).items():
        shapes[f"{name}.weight_q"] = (*batch, rows, cols * q["bits"] // 32)
        shapes[f"{name}.scales"] = shapes[f"{name}.biases"] = (*batch, rows, cols // q["group_size"])
    return shapes


def check_quantization(quantization, n_embd: int, n_neurons: int):
    """The normalised ``quantization`` dict (or None); ConfigError if the bits or group size cannot be used."""
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or not {"bits", "group_size"} <= set(quantization):
        raise ConfigError(f"quantization must be a dict with bits and group_size, got {quantization!r}")
    bits, group_size = quantization["bits"], quantization["group_size"]
    if bits not in BITS:
        raise ConfigError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"quantization group size must be 32, 64 or 128, got {group_size!r}")
    for name, size in (("n_embd", n_embd), ("neurons per head", n_neurons)):
        if size % group_size:
            fitting = [str(g) for g in GROUP_SIZES if not n_embd % g and not n_neurons % g]
            raise ConfigError(f"quantization group size {group_size} does not divide {name} ({size}); "
                              + (f"choose one of {', '.join(fitting)}" if fitting else "no group size fits"))
    return {"bits": int(bits), "group_size": int(group_size), "embedding": bool(quantization.get("embedding", False))}


def make_quantized_weights(config) -> dict:
    """Empty quantized modules for ``config`` (filled by ``load_weights``)."""
    q = config.quantization
    return {
        name: (QuantizedEmbedding if name == "embed" else QuantizedWeight)(shape, q["group_size"], q["bits"])
        for name, shape in stored_shapes(config).items()
    }


def default_group_size(config) -> int:
    """The largest group size that divides both n_embd and the neurons per head (the ConfigError's choice if none)."""
    fitting = [g for g in GROUP_SIZES if not config.n_embd % g and not config.n_neurons % g]
    return max(fitting, default=GROUP_SIZES[-1])


def dequantized_weights(model) -> dict:
    """The float32 weights, under the official names, that a quantized ``model``'s weights stand for."""
    nh, N, D = model.config.n_head, model.config.n_neurons, model.config.n_embd
    embed = model.embed
    return {
        "embed.weight": embed.dequantize() if isinstance(embed, QuantizedEmbedding) else embed.weight,
        "encoder": model.encoder.dequantize().swapaxes(-1, -2),
        "encoder_v": model.encoder_v.dequantize().swapaxes(-1, -2),
        "decoder": model.decoder.dequantize().swapaxes(-1, -2).reshape(nh * N, D),
        "lm_head": model.lm_head.dequantize().T,
    }
