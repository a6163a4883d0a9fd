"""What the analyses share: streaming a text through the recurrent state, checking neuron addresses, snippets."""

import argparse

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from bdh_mlx.arguments import add_checkpoint_argument, positive_int
from bdh_mlx.errors import BDHError
from bdh_mlx.storage.files import eval_mode

KINDS = ("x", "y")
CHUNK_SIZE = 256


class InterpretError(BDHError):
    """A neuron address, text or option an analysis cannot use."""


def as_bytes(text) -> np.ndarray:
    """A str (UTF-8 encoded), bytes or uint8 array as a non-empty uint8 array."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    data = np.frombuffer(text, dtype=np.uint8) if isinstance(text, (bytes, bytearray)) else np.asarray(text)
    if data.size == 0:
        raise InterpretError("the text is empty")
    return data.astype(np.uint8, copy=False).ravel()


def stream_activations(model, data, chunk_size: int = CHUNK_SIZE, progress: bool = True, desc: str = "reading"):
    """Yield ``(start, acts)`` per chunk of ``data``: ``acts[layer][kind]`` is a numpy (nh, T, N) array.

    The chunks continue one another through the model's recurrent state (``model.make_cache(1)``),
    so memory stays bounded on long texts; dropout is off.
    """
    data = as_bytes(data)
    cache = model.make_cache(1)
    with eval_mode(model), tqdm(total=len(data), unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for start in range(0, len(data), chunk_size):
            chunk = data[start : start + chunk_size]
            acts = []
            model(mx.array(chunk[None].astype(np.int32)), cache=cache, activations=acts)
            mx.eval(acts, cache.states)
            yield start, [{kind: np.array(a[kind][0]) for kind in KINDS} for a in acts]
            bar.update(len(chunk))


def check_kind(kind: str):
    if kind not in KINDS:
        raise InterpretError(f"unknown kind {kind!r}: choose x or y")


def check_neuron(config, layer: int, head: int, neuron: int | None = None):
    """Raise InterpretError unless layer, head (and neuron) exist in a model of ``config``."""
    for name, value, count in (("layer", layer, config.n_layer), ("head", head, config.n_head),
                               ("neuron", neuron, config.n_neurons)):
        if value is not None and not 0 <= value < count:
            raise InterpretError(f"{name} {value} out of range: the model has {count} {name}s (0-{count - 1})")


def windows(data: np.ndarray, offsets: np.ndarray, context: int) -> np.ndarray:
    """The bytes ``offset - context .. offset + context`` around each offset (shape offsets.shape + (2c + 1,)).

    Bytes before the start or past the end of ``data``, and rows whose offset is negative (no context), are 0.
    """
    span = offsets[..., None] + np.arange(-context, context + 1)
    valid = (span >= 0) & (span < len(data)) & (offsets[..., None] >= 0)
    return np.where(valid, data[np.clip(span, 0, len(data) - 1)], 0).astype(np.uint8)


def render_snippet(window: np.ndarray, mark: str = "[]") -> str:
    """A window from ``windows`` as text with its middle byte (the firing byte) between ``mark``'s two characters."""
    c = len(window) // 2
    left, right = bytes(window[:c]).lstrip(b"\0"), bytes(window[c + 1 :]).rstrip(b"\0")
    middle = bytes(window[c : c + 1])
    decode = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
    return f"{decode(left)}{mark[0]}{decode(middle)}{mark[1]}{decode(right)}"


# --- What the commands share ----------------------------------------------------


def add_text_arguments(parser, required: bool = True):
    """``--text`` or ``--file``: the text to read."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--text", help="the text to read")
    group.add_argument("--file", metavar="PATH", help="a file whose bytes to read")


def read_text(args) -> np.ndarray:
    """The bytes of ``--text`` or ``--file``; an empty text is an InterpretError."""
    if args.text is not None:
        return as_bytes(args.text)
    with open(args.file, "rb") as f:
        data = f.read()
    if not data:
        raise InterpretError(f"{args.file}: the file is empty")
    return as_bytes(data)


def synapse_address(text: str) -> tuple:
    """An argparse type: ``LAYER:HEAD:I:J``, four non-negative integers."""
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"must be LAYER:HEAD:I:J (four non-negative integers), got {text!r}")
    return tuple(int(p) for p in parts)


def add_common_options(parser):
    add_checkpoint_argument(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=CHUNK_SIZE,
                        help="bytes per step through the recurrent state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
