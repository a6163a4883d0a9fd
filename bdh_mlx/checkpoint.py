"""Self-describing ``.npz`` checkpoints: the official weight names plus the config as JSON."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import BDHError, CheckpointError
from .model import BDH, BDHConfig
from .quantize import quantized_weight_shapes
from .utils import atomic_savez, read_npz

CONFIG_KEY = "__bdh_config__"
FORMAT_KEY = "__bdh_format__"
FORMAT_VERSION = 1


def weight_shapes(config: BDHConfig) -> dict:
    """The official parameter names and their shapes for ``config`` (a quantized config: see quantize.py)."""
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
    """Raise CheckpointError naming ``source`` unless ``weights`` are the official names, shapes and float dtypes."""
    expected = weight_shapes(config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source}: weights do not match the model: {'; '.join(problems)}")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: {name} has shape {got}, but the config needs {shape}")
        if not weight_dtype_ok(name, weights[name].dtype):
            want = "uint32" if name.endswith(".weight_q") else "floating point"
            raise CheckpointError(f"{source}: {name} has dtype {weights[name].dtype}, expected {want}")


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


def save(model: BDH, path):
    """Save ``model`` as one ``.npz`` that ``load`` turns back into a ready model."""
    save_weights(path, model.config, model_weights(model))


def read_checkpoint(path, **config_overrides):
    """Read and check a checkpoint: returns ``(config, weights)`` with numpy weights.

    ``config_overrides`` replace stored config fields that do not change shapes
    (e.g. ``dropout``, ``attention``, ``chunk_size``).
    """
    path = Path(path)
    arrays = read_npz(path, "checkpoint file")
    if CONFIG_KEY not in arrays:
        raise CheckpointError(f"{path}: not a bdh-mlx checkpoint (it has no {CONFIG_KEY} entry)")
    try:
        stored = json.loads(arrays.pop(CONFIG_KEY).tobytes().decode("utf-8"))
        config = BDHConfig.from_dict({**stored, **config_overrides})
    except BDHError as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    arrays.pop(FORMAT_KEY, None)
    check_weights(path, config, arrays)
    return config, arrays


def load(path, **config_overrides) -> BDH:
    """Load a ready model from one ``.npz`` checkpoint (strict: every weight, right shapes)."""
    config, weights = read_checkpoint(path, **config_overrides)
    model = BDH(config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    if config.quantization is not None:
        model.eval()  # inference only
    return model
