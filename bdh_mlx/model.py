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

from .cache import BDHCache
from .errors import ConfigError

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
    prompt_template: dict | None = None  # set by ``bdh-mlx finetune``: see ``template.py``

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.attention not in ATTENTION_FORMS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_FORMS)}, got {self.attention!r}")
        if self.n_neurons < 2 or self.n_neurons % 2:
            raise ConfigError(
                f"mlp_internal_dim_multiplier * n_embd // n_head must be even and positive for RoPE, "
                f"got {self.n_neurons}"
            )
        if self.prompt_template is not None:
            keys = ("prompt", "prompt_input", "end")
            if not isinstance(self.prompt_template, dict) or not all(
                isinstance(self.prompt_template.get(k), str) for k in keys
            ):
                raise ConfigError(f"prompt_template must map {', '.join(keys)} to strings, "
                                  f"got {self.prompt_template!r}")

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


def recurrent_attention_step(qr, v, state):
    """One token: out = qr S (read before writing), then S += outer(qr, v). State in float32."""
    qr32 = qr.astype(state.dtype)
    out = (qr32 @ state).astype(qr.dtype)
    # A broadcast product, not a K = 1 matmul: one pass over the state (memory-bound at large N x D).
    return out, state + qr32.swapaxes(-1, -2) * v.astype(state.dtype)


def chunked_attention(qr, v, state, chunk_size):
    """Masked parallel inside each chunk, the carried state S (B, nh, N, D) across chunks.

    O(T N D) time and O(N D) state instead of O(T^2 N). ``state`` may be None (empty).
    All chunks are processed at once: the state before each chunk is the state given plus an
    exclusive cumulative sum of what each chunk writes (in float32). Slicing chunks one by one
    would make the backward pass build a full-size gradient per chunk.
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
    written = (q.swapaxes(-1, -2) @ val).astype(mx.float32)  # (B, nh, n_chunks, N, D)
    before = mx.cumsum(written, axis=2, inclusive=False)
    if state is not None:
        before = before + state[:, :, None]
    out = parallel_attention(q, val) + (q.astype(mx.float32) @ before).astype(qr.dtype)
    out = out.reshape(B, nh, n_chunks * C, -1)[:, :, :T]
    return out, before[:, :, -1] + written[:, :, -1]


def dropout(x, p: float, keys):
    """Zero each entry with probability ``p`` and scale the rest by 1 / (1 - p).

    x: (B, nh, T, N); keys: (nh, 2), one per head, so a head's mask is the same whether its head is
    computed alone or with the others.
    """
    B, _, T, N = x.shape
    keep = mx.concatenate([mx.random.bernoulli(1 - p, (B, 1, T, N), key=k) for k in keys], axis=1)
    return mx.where(keep, x * (1 / (1 - p)), 0)


def random_keys(n: int):
    """n keys drawn from MLX's global random state, so a compiled step over ``mx.random.state`` replays them."""
    return mx.random.randint(0, 2**31 - 1, (n, 2)).astype(mx.uint32)


def sparse_neurons(v, encoder, encoder_v, decoder, keys, cos, sin, attend, p_drop):
    """The N-wide part of a layer for the heads of ``encoder``: ``(u before its LN, x, y, attention state)``.

    v: (B, 1, T, D); decoder: the rows of these heads; ``keys``: their dropout keys (None: no dropout).
    ``attend(qr, v) -> (out, state)`` is the attention form. A pure function of its arrays, so it can
    be recomputed in the backward pass.
    """
    x = relu(v @ encoder)  # (B, nh, T, N)
    read, state = attend(rope(x, cos, sin), v)
    a = layer_norm(read)  # (B, nh, T, D)
    y = relu(a @ encoder_v)  # (B, nh, T, N)
    xy = x * y if keys is None else dropout(x * y, p_drop, keys)
    # Heads side by side times the decoder = the sum over heads of xy_h @ decoder_h: no (B, T, nh * N) copy.
    per_head = decoder.reshape(encoder.shape[0], -1, decoder.shape[-1])
    return (xy @ per_head).sum(axis=1, keepdims=True), x, y, state


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


class BDH(nn.Module):
    """BDH: one shared layer of sparse neurons, applied ``n_layer`` times.

    ``model(idx, targets=None, cache=None) -> (logits, loss)``.
    """

    def __init__(self, config: BDHConfig):
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
        self._freqs = rope_frequencies(N)  # a constant: the leading "_" keeps it out of parameters()
        self.compute_dtype = mx.float32

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
            form = "parallel" if T <= 4 * self.config.chunk_size else "chunked"
        return form

    def attend(self, form: str, qr, v, state=None):
        """The attention of ``form``: ``(out, state after the last token)``; the parallel form keeps no state."""
        if form == "step":
            return recurrent_attention_step(qr, v, state)
        if form == "chunked":
            return chunked_attention(qr, v, state, self.config.chunk_size)
        return parallel_attention(qr, v), None

    def _recomputed_head(self, h, neurons, v, encoder, encoder_v, decoder, keys):
        """Head h's ``neurons`` (its weights, decoder rows and dropout key), recomputed in the backward pass."""
        N, head = self.config.n_neurons, slice(h, h + 1)
        fn = partial(neurons, keys=None if keys is None else keys[head])
        return recompute_in_backward(fn, v, encoder[head], encoder_v[head], decoder[h * N : (h + 1) * N])

    def __call__(self, idx, targets=None, cache: BDHCache | None = None, activations: list | None = None):
        """Logits (B, T, V) and the mean cross-entropy against ``targets`` (or None).

        With ``cache``, the tokens continue what the cache has seen, and advance it.
        With ``activations`` (a list), each layer appends ``{"x": x, "y": y}`` (B, nh, T, N).
        """
        c = self.config
        B, T = idx.shape
        dtype = self.compute_dtype
        encoder, encoder_v, decoder, lm_head = (
            w.astype(dtype) for w in (self.encoder, self.encoder_v, self.decoder, self.lm_head)
        )
        positions = mx.arange(T) if cache is None else cache.offset[:, None, None] + mx.arange(T)
        cos, sin = rope_cos_sin(positions, self._freqs, dtype)  # (T, N) or (B, 1, T, N)

        form = self.attention_form(T, cache is not None)
        # Long training sequences: one head at a time, recomputed in the backward pass (memory O(T N D)).
        recompute = self.training and form == "chunked" and activations is None
        weights = (encoder, encoder_v, decoder)
        v = layer_norm(self.embed(idx).astype(dtype))[:, None]  # (B, 1, T, D)
        for layer in range(c.n_layer):
            state = None if cache is None else cache.states[layer]
            attend = partial(self.attend, form, state=state)
            keys = random_keys(c.n_head) if self.training and c.dropout > 0 else None
            neurons = partial(sparse_neurons, cos=cos, sin=sin, attend=attend, p_drop=c.dropout)
            if recompute:
                u = sum(self._recomputed_head(h, neurons, v, *weights, keys) for h in range(c.n_head))
            else:
                u, x, y, state = neurons(v, *weights, keys)
                if cache is not None:
                    cache.states[layer] = state
                if activations is not None:
                    activations.append({"x": x, "y": y})
            v = layer_norm(v + layer_norm(u))
        logits = (v[:, 0] @ lm_head).astype(mx.float32)  # (B, T, V)

        if cache is not None:
            cache.offset = cache.offset + T
        if targets is None:
            return logits, None
        return logits, nn.losses.cross_entropy(logits, targets, reduction="mean")
