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

import math
from dataclasses import asdict, dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bdh_mlx.errors import BDHError, ConfigError
from bdh_mlx.modeling.cache import BDHCache, LayerState
from bdh_mlx.modeling.limits import ATTENTION_FORMS, check_config  # noqa: F401  (re-exported)
from bdh_mlx.modeling.quantized import QuantizedWeight, make_quantized_weights
from bdh_mlx.modeling.recompute import recompute_in_backward

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
    quantization: dict | None = None  # {"bits", "group_size", "embedding"}: see modeling/quantized.py
    prompt_template: dict | None = None  # set by ``bdh-mlx finetune``: see ``template.py``

    def __post_init__(self):
        check_config(self)  # bounds that a crafted config cannot pass: see modeling/limits.py

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
    """R_t rotates each pair, so its transpose is R_{-t}: rope with -sin (cos and sin are constants)."""
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
    """One token: out = qr S (read before writing), then S += outer(qr, v), in float32 (``LayerState``).

    ``rows`` (B, nh, R): read S only at these rows, where qr is non-zero (the sparse decoding engine).
    Not traceable (``mx.compile``, ``mx.grad``): the cached one-token form is for decoding only.
    """
    out, state = state.read_then_write(qr.astype(mx.float32), v.astype(mx.float32), rows)
    return out.astype(qr.dtype), state


def _chunk_group(q, val, state):
    """Chunks (B, nh, G, C, N) at once: masked parallel inside each; the state before each is the state given
    (or none) plus an exclusive cumulative sum of what each chunk writes, in float32."""
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

    O(T N D + T C N) time instead of O(T^2 N). ``state`` may be None (empty). Returns the output and the
    state after the last token. Chunks go in groups of ``group`` (default ``chunks_per_group``), all chunks
    of a group at once, the state carried from group to group; each group is recomputed in the backward
    pass, which keeps only the state entering it: about 2 sqrt(2 n_chunks) N D floats per row and head in
    all, where every chunk at once would take 2 n_chunks N D (25m, T 2048, C 256: 64 against 128 MiB).
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

    Measured at 25m (N 8192, D 256; one head's forward, 2 cores): parallel / chunked (C 256) take 146 / 218 ms
    at T 512, 537 / 621 at 1024, 2008 / 1046 at 2048: the switch is at T ~ 1100 (1.5 (C + 2 N D / (N + D))).
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


class BDH(nn.Module):
    """BDH: one shared layer of sparse neurons, applied ``n_layer`` times.

    ``model(idx, targets=None, cache=None) -> (logits, loss)``. ``rope_freqs`` (N,): per-neuron RoPE
    frequencies (``_freqs``, a constant), for merged models whose neurons keep the ones they were trained
    with (default ``rope_frequencies(N)``). ``compute_dtype``: the dtype of the computation (the weights
    keep theirs). ``engine``: computes the one-token layer through a cache while decoding (see
    ``bdh_mlx.inference.engines``; ``bdh_mlx.load`` picks the fastest for the device, dtype and weights).
    None: ``layer`` below, the equations as written.
    """

    def __init__(self, config: BDHConfig, rope_freqs=None, compute_dtype=mx.float32, engine=None):
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
        if config.quantization is not None:  # inference only: see modeling/quantized.py
            for name, weight in make_quantized_weights(config).items():
                setattr(self, name, weight)
        self._freqs = rope_frequencies(N) if rope_freqs is None else mx.array(rope_freqs, dtype=mx.float32)
        if self._freqs.shape != (N,):
            raise ConfigError(f"rope_freqs must have shape ({N},), got {tuple(self._freqs.shape)}")
        self.compute_dtype = compute_dtype
        self.engine = engine

    def make_cache(self, batch_size: int = 1) -> BDHCache:
        """An empty recurrent state: one (B, nh, N, D) float32 matrix per layer."""
        c = self.config
        return BDHCache.empty(batch_size, c.n_layer, c.n_head, c.n_neurons, c.n_embd)

    def attention_form(self, T: int, cached: bool) -> str:
        """``"step"`` (one token through a cache), ``"chunked"`` or ``"parallel"`` for T tokens."""
        if cached:
            return "step" if T == 1 else "chunked"
        c = self.config
        if c.attention != "auto":
            return c.attention
        return "parallel" if parallel_is_faster(T, c.n_neurons, c.n_embd, c.chunk_size) else "chunked"

    def attend(self, form: str, qr, v, state=None):
        """The attention of ``form``: ``(out, state after the last token)``; the parallel form keeps no state."""
        if form == "step":
            return recurrent_attention_step(qr, v, state)
        if form == "chunked":
            out, state = chunked_attention(qr, v, None if state is None else state.whole(), self.config.chunk_size)
            return out, LayerState(state)
        return parallel_attention(qr, v), None

    def weights(self):
        """encoder, encoder_v, decoder and lm_head in the compute dtype (quantized ones as they are)."""
        return tuple(w if isinstance(w, QuantizedWeight) else w.astype(self.compute_dtype)
                     for w in (self.encoder, self.encoder_v, self.decoder, self.lm_head))

    def __call__(self, idx, targets=None, cache: BDHCache | None = None, activations: list | None = None,
                 mask=None, share: BatchShare | None = None):
        """Logits (B, T, V) and the mean cross-entropy against ``targets`` (or None).

        With ``cache``, the tokens continue what the cache has seen, and advance it.
        With ``activations`` (a list), each layer appends ``{"x": x, "y": y}`` (B, nh, T, N).
        ``mask`` (B, T): False (0) at padding positions, which write nothing into the state and are not
        attended to. ``share``: this process's rows of a data-parallel batch (dropout masks).
        """
        c, dtype = self.config, self.compute_dtype
        B, T = idx.shape
        if self.training and c.quantization is not None:
            raise BDHError("a quantized model is for inference only and cannot be trained")
        *weights, lm_head = self.weights()
        positions = mx.arange(T) if cache is None else cache.offset[:, None, None] + mx.arange(T)
        cos, sin = rope_cos_sin(positions, self._freqs, dtype)  # (T, N) or (B, 1, T, N)
        if mask is not None:
            mask = mx.array(mask).astype(dtype)[:, None, :, None]
        form = self.attention_form(T, cache is not None)
        step = self.engine if form == "step" and self.engine is not None and not self.training else None
        recompute = self.training and form == "chunked" and cache is None and activations is None
        p_drop = c.dropout if self.training else 0.0
        v = layer_norm(self.embed(idx).astype(dtype))[:, None]  # (B, 1, T, D)
        for i in range(c.n_layer):
            state = None if cache is None else cache.layers[i]
            if step is not None and activations is None and mask is None:
                v, state = step.layer(v, weights, cos, sin, state, self.encoder_v)
            else:
                v, state, x, y = self.layer(v, weights, form, cos, sin, p_drop, state, share, mask, recompute)
                if activations is not None:
                    activations.append({"x": x, "y": y})
            if cache is not None:
                cache.layers[i] = state
        logits = matmul(v[:, 0], lm_head).astype(mx.float32)  # (B, T, V)
        if cache is not None:
            cache.offset = cache.offset + T
        if targets is None:
            return logits, None
        return logits, nn.losses.cross_entropy(logits, targets, reduction="mean")

    def layer(self, v, weights, form, cos, sin, p_drop, state=None, share=None, mask=None, recompute=False):
        """One layer, ``(its output LN(v + LN(u)), the attention state after it, x, y)``; v: (B, 1, T, D).

        ``recompute``: one head at a time, each recomputed in the backward pass (long training sequences:
        memory O(T N D)); x and y are then not kept (None).
        """
        keys = random_keys(self.config.n_head) if p_drop > 0 else None
        attend = partial(self.attend, form, state=state)
        neurons = partial(sparse_neurons, cos=cos, sin=sin, attend=attend, p_drop=p_drop, share=share, mask=mask)
        if not recompute:
            u, x, y, state = neurons(v, *weights, keys)
            return residual(v, u), state, x, y
        N = self.config.n_neurons
        u = sum(
            recompute_in_backward(partial(neurons, keys=None if keys is None else keys[h : h + 1]),
                                  v, weights[0][h : h + 1], weights[1][h : h + 1], weights[2][h * N : (h + 1) * N])
            for h in range(self.config.n_head)
        )
        return residual(v, u), None, None, None
