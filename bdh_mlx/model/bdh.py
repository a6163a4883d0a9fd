"""The Baby Dragon Hatchling (BDH) language model, written to read like its equations.

Spec: Kosowski et al., "The Dragon Hatchling" (arXiv:2509.26507) and the official
PyTorch code. One set of weights is applied ``n_layer`` times; attention is linear
(no softmax) with Q = K = RoPE(x), so it can also be carried as a fixed-size state.

Names here and in the official ``bdh.py``:

    here  official   what
    v     x          the residual stream, LN'd: (B, 1, T, D)
    x     x_sparse   relu(v @ encoder): the sparse neurons, (B, nh, T, N)
    a     yKV        the attention read, LN'd: (B, nh, T, D)
    y     y_sparse   relu(a @ encoder_v)
    u     yMLP       concat_heads(x * y) @ decoder, LN'd: (B, 1, T, D)
"""

import ctypes
import math
from dataclasses import asdict, dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bdh_mlx.errors import BDHError, ConfigError
from bdh_mlx.inference import cpu_kernel as cpu_step
from bdh_mlx.inference.template import check_template
from bdh_mlx.model.cache import BDHCache, LayerState
from bdh_mlx.model.quantized import QuantizedWeight, check_quantization, make_quantized_weights

ATTENTION_FORMS = ("auto", "parallel", "chunked")
ROPE_THETA = 65536.0
LN_EPS = 1e-5

PRESETS = {
    # Small configurations for tests and CPU demos.
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8),
    "small": dict(n_layer=4, n_embd=128, n_head=4, mlp_internal_dim_multiplier=32),
    # The configurations published with the official code.
    "25m": dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=128),
    "100m": dict(n_layer=6, n_embd=512, n_head=8, mlp_internal_dim_multiplier=128),
}

# Sane upper bounds: far above any real model, low enough that a crafted config cannot hang or overflow.
SIZE_LIMITS = {
    "n_layer": 1024,
    "n_embd": 65536,
    "n_head": 1024,
    "mlp_internal_dim_multiplier": 65536,
    "vocab_size": 2**20,
    "chunk_size": 2**20,
}
MAX_PARAMETERS = 2**34


def _describe_int(value: int) -> str:
    return str(value) if value.bit_length() <= 64 else f"about 2**{int(value).bit_length() - 1}"


@dataclass
class BDHConfig:
    """Model configuration: the official fields and defaults, plus how attention is computed."""

    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256
    dropout: float = 0.1
    attention: str = "auto"  # "parallel" (T x T), "chunked" (carried state), "auto"
    chunk_size: int = 256
    quantization: dict | None = None  # {"bits", "group_size", "embedding"}: see quantize.py
    prompt_template: dict | None = None  # set by ``bdh-mlx finetune``: see ``template.py``

    def __post_init__(self):
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > limit:
                raise ConfigError(f"{name} must be at most {limit:,}, got {_describe_int(value)}")
            setattr(self, name, int(value))
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(self.dropout)
        if self.attention not in ATTENTION_FORMS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_FORMS)}, got {self.attention!r}")
        if self.n_neurons < 2 or self.n_neurons % 2:
            raise ConfigError(
                f"mlp_internal_dim_multiplier * n_embd // n_head must be even and positive for RoPE, "
                f"got {self.n_neurons}"
            )
        if self.num_parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"the config has {self.num_parameters:,} parameters, more than the {MAX_PARAMETERS:,} (2**34) allowed"
            )
        self.quantization = check_quantization(self.quantization, self.n_embd, self.n_neurons)
        self.prompt_template = check_template(self.prompt_template)

    @property
    def n_neurons(self) -> int:
        """N: neurons per head."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        """Trainable parameters: encoder, encoder_v, decoder, embed and lm_head."""
        return 3 * self.n_head * self.n_neurons * self.n_embd + 2 * self.vocab_size * self.n_embd

    @classmethod
    def from_dict(cls, params: dict) -> "BDHConfig":
        """Build a config from a dict, ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BDHConfig":
        """A named preset (``tiny``, ``small``, ``25m``, ``100m``), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def layer_norm(x):
    """LayerNorm over the last axis with no weight and no bias."""
    return mx.fast.layer_norm(x, None, None, LN_EPS)


def residual(v, u):
    """A layer's output from its input v and the decoder's sum u: LN(v + LN(u))."""
    return layer_norm(v + layer_norm(u))


@mx.custom_function
def relu(x):
    """max(x, 0); its backward pass needs only the output, so the input can be freed (saves memory)."""
    return mx.maximum(x, 0)


@relu.vjp
def _relu_vjp(primals, cotangent, output):
    return cotangent * (output > 0)


def rope_frequencies(n_neurons: int) -> mx.array:
    """f[j] = 1 / theta^(2 floor(j/2) / N) / 2pi, in float32; neurons 2i and 2i+1 share one."""
    j = np.arange(n_neurons, dtype=np.float32)
    exponent = (np.floor(j / 2) * 2) / np.float32(n_neurons)
    freqs = np.float32(1.0) / (np.float32(ROPE_THETA) ** exponent) / np.float32(2 * math.pi)
    return mx.array(freqs.astype(np.float32))


def rope_cos_sin(positions: mx.array, freqs: mx.array, dtype=mx.float32):
    """cos and sin of the phases p = (t * f mod 1) * 2pi, shaped (..., T, N)."""
    phases = (positions.astype(mx.float32)[..., None] * freqs) % 1.0 * (2 * math.pi)
    return mx.cos(phases).astype(dtype), mx.sin(phases).astype(dtype)


def rotate_pairs(z):
    """rot(z)[2i] = -z[2i+1], rot(z)[2i+1] = z[2i]."""
    pairs = z.reshape(*z.shape[:-1], -1, 2)
    return mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(z.shape)


@mx.custom_function
def rope(z, cos, sin):
    """R_t(z) = z * cos(p_t) + rot(z) * sin(p_t)."""
    return z * cos + rotate_pairs(z) * sin


@rope.vjp
def _rope_vjp(primals, cotangent, output):
    """R_t is a rotation of each pair (they share a phase), so its transpose is R_{-t}: rope with -sin.

    Cheaper in memory than differentiating the pair shuffle. cos and sin are constants: no gradient.
    """
    z, cos, sin = primals
    return rope(cotangent, cos, -sin), mx.zeros_like(cos), mx.zeros_like(sin)


# --- One attention, three forms -------------------------------------------------
# qr: rotated queries = keys, (B, nh, T, N); v: values, (B, 1, T, D), shared by heads.
# out_t = sum_{s < t} (qr_t . qr_s) v_s. No scaling, no softmax; the token itself is excluded.


def parallel_attention(qr, v):
    """tril(QR QR^T, -1) V: O(T^2 N) per head, best for short sequences."""
    T = qr.shape[-2]
    scores = (qr @ qr.swapaxes(-1, -2)) * mx.tri(T, T, k=-1, dtype=qr.dtype)
    return scores @ v


def recurrent_attention_step(qr, v, state: LayerState, rows=None):
    """One token: out = qr S (read before writing), then S += outer(qr, v). State in float32.

    Memory-bound, so the writes are kept aside (``LayerState``): the whole state is S + Q^T V over the
    last m tokens, and the read is qr S + (qr Q^T) V. Every ``KEPT_WRITES`` tokens they are added to S by
    one rank-K BLAS update, in place when nothing else holds S. Per token S is read once, and read and
    written once per K tokens, where a rank-1 update would read it three times and write it once.
    ``rows`` (B, nh, R): read S only at these rows, where qr is non-zero (``firing_rows``).
    Not traceable (``mx.compile``, ``mx.grad``): the cached one-token form is for decoding only.
    """
    q = qr.astype(mx.float32)
    state = state.with_room()
    written = state.kept(q, v.astype(mx.float32))  # Q written first: the old Q has no other user (in place)
    out = (q @ written.Q.swapaxes(-1, -2)) @ state.V  # V before the write: the token itself is excluded
    S = state.S
    out = out + (q @ S if rows is None else mx.take_along_axis(q, rows[..., None, :], axis=-1) @ take_rows(S, rows))
    return out.astype(qr.dtype), written


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


# Above this fraction of firing RoPE pairs the dense step is faster. Measured at 25m (generate_speed.py
# --densities), sparse / dense time with MLX's steps: 0.40 at 5% of pairs firing, 0.53 at 10%, 0.80 at 19%,
# 1.07 at 27%; with the CPU kernel's (cpu_step.py): 0.62 at 10%, 0.99 at 19%, 0.93 at 27%, 1.07 at 36%.
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


def _chunk_group(q, val, state):
    """Chunks (B, nh, G, C, N) at once: masked parallel inside each, the state before each across them.

    The state before each chunk is the state given (or none) plus an exclusive cumulative sum of what
    each chunk writes, in float32: two (B, nh, G, N, D) tensors.
    """
    written = (q.swapaxes(-1, -2) @ val).astype(mx.float32)  # (B, nh, G, N, D)
    before = mx.cumsum(written, axis=2, inclusive=False)
    if state is not None:
        before = before + state[:, :, None]
    out = parallel_attention(q, val) + (q.astype(mx.float32) @ before).astype(q.dtype)
    return out, before[:, :, -1] + written[:, :, -1]


def chunks_per_group(n_chunks: int) -> int:
    """G = ceil(sqrt(n_chunks / 2)): minimises the 2 G states of a group plus the n_chunks / G saved ones."""
    return max(1, math.ceil(math.sqrt(n_chunks / 2)))


def chunked_attention(qr, v, state, chunk_size, group=None):
    """Masked parallel inside each chunk of C tokens, the carried state S (B, nh, N, D) across chunks.

    O(T N D + T C N) time instead of O(T^2 N). ``state`` may be None (empty).
    Chunks go in groups of ``group`` (default ``chunks_per_group``): all chunks of a group at once,
    the state carried from group to group; each group is recomputed in the backward pass, which keeps
    only the state entering it. Memory per batch row and head, in float32 besides the inputs and
    outputs: 2 G N D while a group runs (its writes and the states before its chunks; 3 G N D when a
    state is given) + (n_chunks / G) N D kept for the backward pass
    + G C^2 (its masked scores); about 2 sqrt(2 n_chunks) N D in all, where computing every chunk at
    once would take 2 n_chunks N D (25m, T 2048, C 256: 64 MiB against 128 MiB per head).
    Groups are split with ``mx.split``, whose backward pass concatenates: no full-size gradient per group.
    Returns the output and the state after the last token.
    """
    B, nh, T, N = qr.shape
    C = min(chunk_size, T)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T  # zero rows write nothing and their outputs are dropped
    if pad:
        qr = mx.pad(qr, [(0, 0), (0, 0), (0, pad), (0, 0)])
        v = mx.pad(v, [(0, 0), (0, 0), (0, pad), (0, 0)])
    q = qr.reshape(B, nh, n_chunks, C, N)
    val = v.reshape(*v.shape[:2], n_chunks, C, v.shape[-1])
    G = group or chunks_per_group(n_chunks)
    cuts = list(range(G, n_chunks, G))
    outs = []
    for q_group, v_group in zip(mx.split(q, cuts, axis=2), mx.split(val, cuts, axis=2), strict=True):
        if state is None:
            out, state = mx.checkpoint(lambda q, val: _chunk_group(q, val, None))(q_group, v_group)
        else:
            out, state = mx.checkpoint(_chunk_group)(q_group, v_group, state)
        outs.append(out)
    out = mx.concatenate(outs, axis=2).reshape(B, nh, n_chunks * C, -1)[:, :, :T]
    return out, state


CHUNKED_FLOP_COST = 1.5  # measured: per flop, the chunked form runs about 1.5x slower than the parallel one


def parallel_is_faster(T: int, N: int, D: int, chunk_size: int) -> bool:
    """The cost model of ``attention="auto"``: parallel T^2 (N + D) flops against chunked T (C (N + D) + 2 N D).

    Per head: the parallel form multiplies T x N by N x T and T x T by T x D; the chunked form does
    the same inside chunks of C and writes and reads an N x D state per chunk. Measured at 25m
    (N 8192, D 256; forward of one head, 2 cores): parallel and chunked (C 256) take 146 / 218 ms at
    T 512, 537 / 621 at 1024, 2008 / 1046 at 2048: the switch is at T ~ 1100 (1.5 (C + 2 N D / (N + D))).
    """
    return T * (N + D) <= CHUNKED_FLOP_COST * (chunk_size * (N + D) + 2 * N * D)


@dataclass(frozen=True)
class BatchShare:
    """A process's rows of a data-parallel batch: ``first`` .. ``first + B - 1`` of ``total``."""

    first: int
    total: int


def dropout(x, p: float, keys, share: BatchShare | None = None):
    """Zero each entry with probability ``p`` and scale the rest by 1 / (1 - p).

    x: (B, nh, T, N); keys: (nh, 2), one per head, so a head's mask is the same whether its head is
    computed alone or with the others. With ``share``, the masks of the whole batch are drawn and this
    process's rows taken: processes drop differently, and as one process with the whole batch would.
    """
    B, _, T, N = x.shape
    first, total = (0, B) if share is None else (share.first, share.total)
    keep = mx.concatenate(
        [mx.random.bernoulli(1 - p, (total, 1, T, N), key=k)[first : first + B] for k in keys], axis=1
    )
    return mx.where(keep, x * (1 / (1 - p)), 0)


def random_keys(n: int):
    """n keys drawn from MLX's global random state, so a compiled step over ``mx.random.state`` replays them."""
    return mx.random.randint(0, 2**31 - 1, (n, 2)).astype(mx.uint32)


def matmul(x, w):
    """``x @ w`` for a float weight ``(..., in, out)`` or a QuantizedWeight (which stores ``w`` transposed)."""
    return w(x) if isinstance(w, QuantizedWeight) else x @ w


def sparse_neurons(v, encoder, encoder_v, decoder, keys, cos, sin, attend, p_drop, share=None, mask=None):
    """The N-wide part of a layer for the heads of ``encoder``: ``(u before its LN, x, y, attention state)``.

    v: (B, 1, T, D); decoder: the rows of these heads; ``keys``: their dropout keys (None: no dropout).
    ``attend(qr, v) -> (out, state)`` is the attention form. A pure function of its arrays, so it can
    be recomputed in the backward pass. ``mask`` (B, 1, T, 1): 0 at padding, whose values are not written.
    """
    x = relu(matmul(v, encoder))  # (B, nh, T, N)
    read, state = attend(rope(x, cos, sin), v if mask is None else v * mask)
    u, y = fire(x, layer_norm(read), encoder_v, decoder, keys, p_drop, share)  # a = LN(read): (B, nh, T, D)
    return u, x, y, state


def fire(x, a, encoder_v, decoder, keys=None, p_drop=0.0, share=None):
    """``(u before its LN, y)``: y = relu(a @ encoder_v), then the heads of x y side by side times the decoder.

    decoder: (nh * N, D), or per head (..., nh, N, D). The product is the sum over heads of
    xy_h @ decoder_h: no (B, T, nh * N) copy.
    """
    y = relu(matmul(a, encoder_v))  # (B, nh, T, N)
    xy = x * y if keys is None else dropout(x * y, p_drop, keys, share)
    per_head = decoder
    if not isinstance(decoder, QuantizedWeight) and decoder.ndim == 2:
        per_head = decoder.reshape(x.shape[1], -1, decoder.shape[-1])
    return matmul(xy, per_head).sum(axis=1, keepdims=True), y


def sparse_neurons_step(v, encoder, encoder_v, decoder, cos, sin, state: LayerState, max_density, encoder_v_rows):
    """``sparse_neurons`` for one token through the cache, reading only the rows of the neurons that fire.

    x needs the whole encoder; then, when few RoPE pairs fire (``firing_rows``), S is read at the rows of
    the firing pairs, and encoder_v (its columns, as rows of ``encoder_v_rows()`` (nh, N, D), asked for only
    then) and the decoder at the firing neurons only: the same sums without their zero terms. Otherwise
    the dense step.
    Returns ``(the layer's output, state)``: ``residual(v, u)``.
    """
    x = relu(matmul(v, encoder))  # (B, nh, 1, N)
    firing = firing_rows(x, max_density)
    read, state = recurrent_attention_step(rope(x, cos, sin), v, state, None if firing is None else firing[0])
    a = layer_norm(read)
    if firing is None:
        return residual(v, fire(x, a, encoder_v, decoder)[0]), state
    rows = encoder_v_rows()
    nh, N, D = rows.shape
    neurons = firing[1]
    x = mx.take_along_axis(x, neurons[..., None, :], axis=-1)  # (B, nh, 1, R)
    weights = take_rows(rows, neurons).swapaxes(-1, -2), take_rows(decoder.reshape(nh, N, D), neurons)
    return residual(v, fire(x, a, *weights)[0]), state


def recompute_in_backward(fn, *inputs):
    """``fn(*inputs)[0]``, keeping only the inputs: ``fn`` is recomputed in the backward pass.

    Like mx.checkpoint, but the first input's gradient is passed on only once the others' are taken,
    while the recomputed activations are alive; otherwise every call's N-wide gradients wait for the end.
    """

    def output(*inputs):
        return fn(*inputs)[0]

    @mx.custom_function
    def checkpointed(*inputs):
        return output(*inputs)

    @checkpointed.vjp
    def checkpointed_vjp(primals, cotangent, _):
        primals = mx.depends(list(primals), cotangent)  # recompute only when the backward pass gets here
        _, (first, *rest) = mx.vjp(output, primals, [cotangent])
        return (mx.depends(first, rest), *rest)

    return checkpointed(*inputs)


@dataclass
class DerivedWeight:
    """An array made from a weight (``value``), valid while the weight's data is where it was then.

    ``source`` is a view of the weight: it shares its buffer, so an in-place edit of the weight
    (``model.encoder_v[..., j] = 0``, ``+=``) cannot write into that buffer and moves the weight's data;
    a replaced weight has other data too. A plain object, not an array, dict, list or tuple, so
    ``nn.Module`` keeps it out of ``model.state``: it is neither saved nor traced by the training step.
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


def data_address(a) -> int:
    """Where the data of ``a`` is in memory (evaluates it)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(a)))


class BDH(nn.Module):
    """BDH: one shared layer of sparse neurons, applied ``n_layer`` times.

    ``model(idx, targets=None, cache=None) -> (logits, loss)``. ``rope_freqs`` (N,): per-neuron RoPE
    frequencies, for merged models whose neurons keep the ones they were trained with (default
    ``rope_frequencies(N)``).
    """

    def __init__(self, config: BDHConfig, rope_freqs=None, compute_dtype=mx.float32):
        super().__init__()
        self.config = config
        D, nh, N, V = config.n_embd, config.n_head, config.n_neurons, config.vocab_size
        init = nn.init.normal(mean=0.0, std=0.02)
        self.embed = nn.Embedding(V, D)
        self.embed.weight = init(mx.zeros((V, D)))
        self.encoder = init(mx.zeros((nh, D, N)))
        self.encoder_v = init(mx.zeros((nh, D, N)))
        self.decoder = init(mx.zeros((nh * N, D)))
        self.lm_head = init(mx.zeros((D, V)))
        if config.quantization is not None:  # inference only: see quantize.py
            for name, weight in make_quantized_weights(config).items():
                setattr(self, name, weight)
        # A constant: the leading "_" keeps it out of parameters().
        self._freqs = rope_frequencies(N) if rope_freqs is None else mx.array(rope_freqs, dtype=mx.float32)
        if self._freqs.shape != (N,):
            raise ConfigError(f"rope_freqs must have shape ({N},), got {tuple(self._freqs.shape)}")
        self.compute_dtype = compute_dtype
        self.sparse_step_density = SPARSE_STEP_DENSITY  # 0: always the dense decoding step
        self.cpu_kernel = True  # on the CPU in float32, decode with numpy's BLAS (cpu_step.py)
        self._encoder_v_rows = DerivedWeight()  # see encoder_v_rows

    def encoder_v_rows(self, dtype):
        """encoder_v as (nh, N, D), each neuron's column a contiguous row, for the sparse decoding step.
        Made the first time a token fires sparsely (a dense model never holds it), kept, and made again when
        encoder_v changes (replaced, or edited in place)."""
        return self._encoder_v_rows.get(self.encoder_v, lambda w: mx.contiguous(w.swapaxes(-1, -2)), dtype)

    def set_compute_dtype(self, dtype):
        """Compute in ``dtype`` (e.g. mx.bfloat16) while the weights keep their own dtype."""
        self.compute_dtype = dtype
        return self

    def make_cache(self, batch_size: int = 1) -> BDHCache:
        """An empty recurrent state: one (B, nh, N, D) float32 matrix per layer."""
        c = self.config
        return BDHCache.empty(batch_size, c.n_layer, c.n_head, c.n_neurons, c.n_embd)

    def attention_form(self, T: int, cached: bool) -> str:
        """``"step"`` (one token through a cache), ``"chunked"`` or ``"parallel"`` for T tokens."""
        if cached:
            return "step" if T == 1 else "chunked"
        form = self.config.attention
        if form == "auto":
            c = self.config
            form = "parallel" if parallel_is_faster(T, c.n_neurons, c.n_embd, c.chunk_size) else "chunked"
        return form

    def attend(self, form: str, qr, v, state=None):
        """The attention of ``form``: ``(out, state after the last token)``; the parallel form keeps no state."""
        if form == "step":
            return recurrent_attention_step(qr, v, state)
        if form == "chunked":
            out, state = chunked_attention(qr, v, None if state is None else state.whole(), self.config.chunk_size)
            return out, LayerState(state)
        return parallel_attention(qr, v), None

    def _recomputed_head(self, h, neurons, v, encoder, encoder_v, decoder, keys):
        """Head h's ``neurons`` (its weights, decoder rows and dropout key), recomputed in the backward pass."""
        N, head = self.config.n_neurons, slice(h, h + 1)
        fn = partial(neurons, keys=None if keys is None else keys[head])
        return recompute_in_backward(fn, v, encoder[head], encoder_v[head], decoder[h * N : (h + 1) * N])

    def __call__(self, idx, targets=None, cache: BDHCache | None = None, activations: list | None = None,
                 mask=None, share: BatchShare | None = None):
        """Logits (B, T, V) and the mean cross-entropy against ``targets`` (or None).

        With ``cache``, the tokens continue what the cache has seen, and advance it.
        With ``activations`` (a list), each layer appends ``{"x": x, "y": y}`` (B, nh, T, N).
        ``mask`` (B, T): False (0) at padding positions, which write nothing into the state and are not
        attended to. ``share``: this process's rows of a data-parallel batch (dropout masks).
        """
        c = self.config
        B, T = idx.shape
        dtype = self.compute_dtype
        if self.training and c.quantization is not None:
            raise BDHError("a quantized model is for inference only and cannot be trained; call model.eval()")
        encoder, encoder_v, decoder, lm_head = (
            w if isinstance(w, QuantizedWeight) else w.astype(dtype)
            for w in (self.encoder, self.encoder_v, self.decoder, self.lm_head)
        )
        positions = mx.arange(T) if cache is None else cache.offset[:, None, None] + mx.arange(T)
        cos, sin = rope_cos_sin(positions, self._freqs, dtype)  # (T, N) or (B, 1, T, N)

        form = self.attention_form(T, cache is not None)
        # Long training sequences: one head at a time, recomputed in the backward pass (memory O(T N D)).
        recompute = self.training and form == "chunked" and activations is None and cache is None
        weights = (encoder, encoder_v, decoder)
        v = layer_norm(self.embed(idx).astype(dtype))[:, None]  # (B, 1, T, D)
        layer_step = None  # a one-token step for inference, or the step of ``attend``
        if mask is not None:
            mask = mx.array(mask).astype(dtype)[:, None, :, None]
        if form == "step" and not self.training and activations is None and mask is None:
            if self.cpu_kernel and cpu_step.applies(weights, dtype):
                layer_step = cpu_step.layer_step
            elif self.sparse_step_density > 0 and not isinstance(self.encoder_v, QuantizedWeight):
                layer_step = sparse_neurons_step
        for layer in range(c.n_layer):
            state = None if cache is None else cache.layers[layer]
            attend = partial(self.attend, form, state=state)
            keys = random_keys(c.n_head) if self.training and c.dropout > 0 else None
            neurons = partial(sparse_neurons, cos=cos, sin=sin, attend=attend, p_drop=c.dropout, share=share, mask=mask)
            if recompute:
                v = residual(v, sum(self._recomputed_head(h, neurons, v, *weights, keys) for h in range(c.n_head)))
            elif layer_step is not None:
                v, cache.layers[layer] = layer_step(
                    v, *weights, cos, sin, state, self.sparse_step_density, partial(self.encoder_v_rows, dtype)
                )
            else:
                u, x, y, state = neurons(v, *weights, keys)
                if cache is not None:
                    cache.layers[layer] = state
                if activations is not None:
                    activations.append({"x": x, "y": y})
                v = residual(v, u)
        logits = matmul(v[:, 0], lm_head).astype(mx.float32)  # (B, T, V)

        if cache is not None:
            cache.offset = cache.offset + T
        if targets is None:
            return logits, None
        return logits, nn.losses.cross_entropy(logits, targets, reduction="mean")
