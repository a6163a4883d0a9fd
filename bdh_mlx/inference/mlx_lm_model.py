"""BDH as an mlx-lm model: what the model file of an exported folder imports (``--trust-remote-code``).

mlx-lm builds ``Model(ModelArgs.from_dict(config))``, loads the weights under their official names and calls
``model(tokens, cache=cache)`` for logits (B, T, V). The recurrent state lives in one of mlx-lm's own
``ArraysCache``: entries ``0 .. n_layer - 1`` hold each layer's state S (B, nh, N, D) in float32, entry
``n_layer`` how many tokens each row has seen. So ``mlx_lm.cache_prompt`` files load back
(``load_prompt_cache`` knows the class), and the server's batching (merge, extend, filter, extract) moves rows
as it does for mlx-lm's recurrent models. Padding positions (the mask of the cache's ``lengths`` and
``left_padding``) write nothing into the state and take no position.

An instruction-tuned model ends its answers with a marker of several bytes (``<|end|>``), while mlx-lm stops at
one end-of-sequence token: its tokenizer has a token 256 for the marker, and after the model has written the
marker's last byte the adapter gives token 256 all the probability. To see the marker, the cache holds each
row's last bytes (one more ``ArraysCache`` entry); token 256 fed back in is treated as padding.

While decoding, ``LayerState`` keeps a layer's last writes aside (``model/cache.py``); the cache is given
``LayerState.whole()`` as a lazy array, computed only when mlx-lm reads it, and the kept writes are used again
as long as the cache still holds that same array.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from bdh_mlx.errors import BDHError
from bdh_mlx.inference.engines import choose_engine
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.cache import BDHCache
from bdh_mlx.storage.format import ROPE_FREQS_KEY, config_from_stored

LORA_MESSAGE = ("BDH has no per-layer linear layers for mlx-lm's LoRA to adapt (one set of weights serves every "
                "layer); fine-tune with bdh-mlx finetune instead")


@dataclass
class ModelArgs:
    """The model's BDHConfig, from config.json's ``bdh`` entry (checked as bdh-mlx checks a checkpoint's)."""

    config: BDHConfig

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        if not isinstance(params.get("bdh"), dict):
            raise BDHError("config.json has no 'bdh' entry: not a bdh-mlx model folder")
        return cls(config_from_stored("config.json", params["bdh"], {}))


class Model(BDH):
    """BDH with mlx-lm's calling convention: ``model(inputs, cache=None) -> logits`` and ``make_cache()``."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.config, engine=choose_engine(args.config))  # as bdh_mlx.load chooses
        template = args.config.prompt_template
        # the marker's bytes; a constant: the leading "_" keeps it out of parameters()
        self._end = None if template is None else mx.array(list(template["end"].encode("utf-8")), dtype=mx.int32)

    @property
    def layers(self):
        raise BDHError(LORA_MESSAGE)

    def sanitize(self, weights: dict) -> dict:
        """Take per-neuron RoPE frequencies (merged models) out of the weights into the model."""
        freqs = weights.pop(ROPE_FREQS_KEY, None)
        if freqs is not None:
            if freqs.shape != self._freqs.shape:
                raise BDHError(f"{ROPE_FREQS_KEY} has shape {freqs.shape}, expected {self._freqs.shape}")
            self._freqs = freqs.astype(mx.float32)
        return weights

    def make_cache(self) -> list:
        """One ``ArraysCache``: the layers' states, the tokens seen per row and, for an instruction-tuned model,
        each row's last bytes (filled at the first call)."""
        return [ArraysCache(self.config.n_layer + (1 if self._end is None else 2))]

    def __call__(self, inputs: mx.array, cache: list | None = None, input_embeddings=None):
        if input_embeddings is not None:
            raise BDHError("BDH reads bytes: input_embeddings are not supported")
        if cache is None:
            return super().__call__(inputs)[0]
        store = cache[0]
        B, T = inputs.shape
        mask = store.make_mask(T)
        if self._end is not None and (inputs >= self.config.vocab_size).any().item():  # the end token fed back
            mask = (inputs < self.config.vocab_size) & (True if mask is None else mask)
            inputs = mx.where(mask, inputs, 0)
        if mask is not None and mask.all().item():
            mask = None  # the fast one-token steps take no mask
        state = take_state(store, B, self.config)
        seen = state.offset
        if mask is not None:  # padding takes no position: the row's first real token comes next
            state.offset = seen - mx.argmax(mask, axis=1).astype(mx.int32)
        logits, _ = super().__call__(inputs, cache=state, mask=mask)
        if mask is not None:
            state.offset = seen + mask.sum(axis=1).astype(mx.int32)
        give_state(store, state)
        store.advance(T)
        return logits if self._end is None else self.end_after_marker(store, inputs, mask, logits)

    def end_after_marker(self, store: ArraysCache, inputs, mask, logits):
        """Logits with the end token (256) as one more column: -inf, except after the marker, where the last
        position gives the end token all the probability. Keeps each row's last bytes in ``store``."""
        n, K = self.config.n_layer + 1, self._end.size
        B, T = inputs.shape
        recent = mx.full((B, K), -1, mx.int32) if store[n] is None else store[n]
        seen = mx.concatenate([recent, inputs.astype(mx.int32)], axis=1)
        if mask is None:
            store[n] = seen[:, -K:]
        else:  # the last K bytes before the padding that follows a row's real tokens
            ends = mx.argmax(mask, axis=1) + mask.sum(axis=1)
            store[n] = mx.take_along_axis(seen, ends[:, None] + mx.arange(K), axis=1)
        ended = (store[n] == self._end).all(axis=1)[:, None]  # (B, 1)
        logits = mx.pad(logits, [(0, 0), (0, 0), (0, 1)], constant_values=-mx.inf)
        only_end = mx.where(mx.arange(logits.shape[-1]) == self.config.vocab_size, 0.0, -mx.inf)
        last = mx.where(ended, only_end, logits[:, -1])
        return mx.concatenate([logits[:, :-1], last[:, None]], axis=1)


def take_state(store: ArraysCache, batch_size: int, config: BDHConfig) -> BDHCache:
    """The state in ``store`` as a BDHCache (empty at the first call), with the writes kept aside by the last call
    when ``store`` still holds what that call left. ``store`` lets go of its arrays, so the step can update
    the state in place."""
    n = config.n_layer
    if store[n] is None:
        return BDHCache.empty(batch_size, n, config.n_head, config.n_neurons, config.n_embd)
    kept, wholes = getattr(store, "bdh_kept", None) or ((), ())
    state = BDHCache(store.cache[:n], store[n])
    if len(wholes) == n and all(a is b for a, b in zip(wholes, store.cache, strict=False)):
        state.layers = list(kept)
    store.cache[:n], store.bdh_kept = [None] * n, None
    return state


def give_state(store: ArraysCache, state: BDHCache):
    """Put ``state`` back into ``store``: each layer's whole S (lazy), and the writes kept aside beside it."""
    n = len(state.layers)
    mx.async_eval(state.state)  # the state's updates computed while mlx-lm samples, as bdh-mlx's own loop does
    wholes = [layer.whole() for layer in state.layers]
    store.cache[:n] = wholes
    store[n] = state.offset
    store.bdh_kept = (tuple(state.layers), tuple(wholes))

