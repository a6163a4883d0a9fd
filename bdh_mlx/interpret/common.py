"""What the analyses share: streaming a text through the recurrent state, checking neuron addresses, snippets."""

import argparse
import importlib.util

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from bdh_mlx.arguments import INTERPRET, add_checkpoint_argument, describe_missing, positive_int
from bdh_mlx.errors import BDHError
from bdh_mlx.storage.files import eval_mode

KINDS = ("x", "y")
CHUNK_SIZE = 256


EXTRAS = INTERPRET  # pip install "bdh-mlx[interpret]": matplotlib, scipy, networkx, powerlaw
DEFAULT_MAX_BYTES = 50_000  # of the built-in corpus, when no text is given


class InterpretError(BDHError):
    """A neuron address, text or option an analysis cannot use."""


def require(*modules: str):
    """Raise InterpretError naming the install command unless every one of ``modules`` can be imported (the
    same line as a ModuleNotFoundError gives in ``run_command``, naming the interpret extra)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InterpretError(describe_missing(missing, EXTRAS))


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


def add_text_arguments(parser, default_max_bytes: int | None = DEFAULT_MAX_BYTES):
    """``--text`` or ``--file`` (default: the built-in corpus, as for ``train``), and ``--max-bytes``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text", help="the text to read")
    group.add_argument("--file", metavar="PATH", help="a file whose bytes to read")
    limit = f"; default: all of --text/--file, {default_max_bytes:,} of the corpus" if default_max_bytes else ""
    parser.add_argument("--max-bytes", type=positive_int, metavar="N",
                        help=f"read only the first N bytes (default text: the built-in pydoc_data corpus{limit})")


def read_text(args, default_max_bytes: int | None = DEFAULT_MAX_BYTES) -> tuple:
    """``(bytes, source)`` of ``--text``, ``--file`` or else the built-in corpus, cut to ``--max-bytes``
    (for the corpus, ``default_max_bytes`` unless given); an empty text is an InterpretError."""
    limit = args.max_bytes
    if args.text is not None:
        data, source = args.text.encode("utf-8"), "--text"
    elif args.file is not None:
        with open(args.file, "rb") as f:
            data, source = f.read(), args.file
        if not data:
            raise InterpretError(f"{args.file}: the file is empty")
    else:
        from bdh_mlx.training.data import default_corpus_bytes

        data, source, limit = default_corpus_bytes(), "the built-in corpus (pydoc_data)", limit or default_max_bytes
    return as_bytes(data[:limit] if limit else data), source


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
