"""The checkpoint format: a self-describing ``.npz`` of the official weight names plus the config as JSON, and the
strict checks of what it may hold (``checkpoint.py`` reads and writes whole models with them)."""

import json
from dataclasses import fields

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from bdh_mlx.errors import BDHError, CheckpointError
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.quantized import quantized_weight_shapes
from bdh_mlx.storage.files import NPY_HEADER_MAX, NPY_PREFIX_MAX, NpzReader, atomic_savez, check_names

CONFIG_KEY = "__bdh_config__"
FORMAT_KEY = "__bdh_format__"
FORMAT_VERSION = 1
CONFIG_MAX_BYTES = 64 * 1024  # the config JSON is a few hundred bytes
SMALL_ENTRY_BYTES = NPY_PREFIX_MAX + NPY_HEADER_MAX + 8  # a .npy header and one scalar
# Arrays a checkpoint may hold besides the weights: name -> shape for a config. Absent ones are fine.
# Per-neuron RoPE frequencies (N,), stored only when they are not rope_frequencies(N): merged models.
ROPE_FREQS_KEY = "rope_freqs"
# Config fields added after format 1's first release: optional (None when absent), each a small mapping that
# BDHConfig checks. Every other field must be stored.
NESTED_FIELDS = {"quantization", "prompt_template"}
OPTIONAL_KEYS = {ROPE_FREQS_KEY: lambda config: (config.n_neurons,)}


def weight_shapes(config: BDHConfig) -> dict:
    """The official parameter names and their shapes for ``config`` (a quantized config: see modeling/quantized.py)."""
    D, nh, N, V = config.n_embd, config.n_head, config.n_neurons, config.vocab_size
    shapes = {
        "embed.weight": (V, D),
        "encoder": (nh, D, N),
        "encoder_v": (nh, D, N),
        "decoder": (nh * N, D),
        "lm_head": (D, V),
    }
    if config.quantization is None:
        return shapes
    quantized = quantized_weight_shapes(config)
    replaced = {name.rsplit(".", 1)[0] for name in quantized}
    return {**{k: v for k, v in shapes.items() if k.split(".")[0] not in replaced}, **quantized}


def weight_dtype_ok(name: str, dtype) -> bool:
    """Quantized values (``*.weight_q``) are uint32; every other weight is floating point."""
    return dtype == np.uint32 if name.endswith(".weight_q") else np.issubdtype(dtype, np.floating)


def check_weights(source, config: BDHConfig, weights: dict):
    """Raise CheckpointError naming ``source`` unless ``weights`` are the official names, shapes and float dtypes.

    ``weights`` may be arrays or ``.npy`` headers (anything with ``shape`` and ``dtype``); names in
    ``OPTIONAL_KEYS`` may be present too.
    """
    expected = expected_arrays(config, weights)
    check_names(source, "weights do not match the model", expected, weights)
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: {name} has shape {got}, but the config needs {shape}")
        if not weight_dtype_ok(name, weights[name].dtype):
            want = "uint32" if name.endswith(".weight_q") else "floating point"
            raise CheckpointError(f"{source}: {name} has dtype {weights[name].dtype}, expected {want}")


def expected_arrays(config: BDHConfig, names) -> dict:
    """The shapes of the weights ``config`` needs, plus those of the optional arrays among ``names``."""
    optional = {name: shape(config) for name, shape in OPTIONAL_KEYS.items() if name in names}
    return {**weight_shapes(config), **optional}


def check_finite(source, weights: dict):
    """Raise CheckpointError naming ``source`` and the first array that holds NaN or an infinity."""
    for name, array in weights.items():
        if not np.isfinite(array).all():
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values (a diverged or damaged model)")


def model_weights(model: BDH) -> dict:
    """The model's parameters as numpy arrays under their official names: float32 (quantized values stay uint32)."""
    return {
        k: np.array(v if v.dtype == mx.uint32 else v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
    }


def save_weights(path, config: BDHConfig, weights: dict):
    """Write numpy ``weights`` and ``config`` as one checkpoint, atomically."""
    arrays = dict(weights)
    arrays[CONFIG_KEY] = np.frombuffer(json.dumps(config.to_dict()).encode("utf-8"), dtype=np.uint8)
    arrays[FORMAT_KEY] = np.array(FORMAT_VERSION, dtype=np.int32)
    atomic_savez(path, arrays)


def read_config(source, raw: np.ndarray, overrides: dict) -> BDHConfig:
    """The config stored as JSON bytes: a flat object holding every BDHConfig field (unknown keys ignored)."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{source}: unreadable config (a {raw.dtype} array of shape {raw.shape}, not bytes)")
    try:
        stored = json.loads(raw.tobytes().decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{source}: unreadable config (JSON nested too deeply)") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: unreadable config ({e})") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{source}: unreadable config (a JSON {type(stored).__name__}, not an object)")
    return config_from_stored(source, stored, overrides)


def config_from_stored(source, stored: dict, overrides: dict) -> BDHConfig:
    """A BDHConfig from a stored JSON object holding every field (unknown keys ignored), checked."""
    missing = [f.name for f in fields(BDHConfig) if f.name not in stored and f.name not in NESTED_FIELDS]
    if missing:
        raise CheckpointError(f"{source}: invalid config: missing {', '.join(missing)}")
    nested = [key for key, value in stored.items() if isinstance(value, (dict, list)) and key not in NESTED_FIELDS]
    if nested:
        raise CheckpointError(f"{source}: invalid config: {nested[0]} is not a single value")
    try:
        return BDHConfig.from_dict({**stored, **overrides})
    except BDHError as e:
        raise CheckpointError(f"{source}: invalid config: {e}") from None


def check_format(source, npz: NpzReader):
    """Refuse a checkpoint written in a newer format (a file without the entry is format 1)."""
    if FORMAT_KEY not in npz.names:
        return
    version = npz.read(FORMAT_KEY, kinds="iu", max_bytes=SMALL_ENTRY_BYTES)
    if version.size != 1:
        raise CheckpointError(f"{source}: {FORMAT_KEY} holds {version.size} values, expected one version number")
    version = int(version.reshape(()))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format {version} comes from a newer bdh-mlx; this version reads format "
            f"{FORMAT_VERSION} (pip install -U bdh-mlx)"
        )
    if version < 1:
        raise CheckpointError(f"{source}: unknown checkpoint format {version}")


def read_weight(npz: NpzReader, name: str) -> np.ndarray:
    """A weight as float32, or a quantized weight's packed values as uint32."""
    if name.endswith(".weight_q"):
        return npz.read(name, kinds="u")
    return npz.read(name, kinds="f").astype(np.float32, copy=False)


