"""Whole models in and out of checkpoints: ``save``, ``load`` (a ``.npz``, an mlx-lm folder or a Hub repo id),
``read_checkpoint``; the format itself is ``format.py``."""

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np

from bdh_mlx.errors import CheckpointError
from bdh_mlx.inference.byte_tokenizer import ByteTokenizer
from bdh_mlx.inference.engines import choose_engine
from bdh_mlx.model import BDH, rope_frequencies
from bdh_mlx.modeling.quantized import dequantized_weights
from bdh_mlx.storage import mlx_lm
from bdh_mlx.storage.files import NpzReader, check_names
from bdh_mlx.storage.format import (
    CONFIG_KEY,
    CONFIG_MAX_BYTES,
    FORMAT_KEY,
    ROPE_FREQS_KEY,
    SMALL_ENTRY_BYTES,
    check_finite,
    check_format,
    check_weights,
    expected_arrays,
    model_weights,
    read_config,
    read_weight,
    save_weights,
)
from bdh_mlx.storage.hub import resolve_checkpoint


def model_rope_freqs(model: BDH) -> dict:
    """``{ROPE_FREQS_KEY: freqs}`` when the model's RoPE frequencies are not the default ones, else ``{}``."""
    freqs = np.array(model._freqs)
    return {} if np.array_equal(freqs, np.array(rope_frequencies(freqs.size))) else {ROPE_FREQS_KEY: freqs}


def save(model: BDH, path):
    """Save ``model`` as one ``.npz`` that ``load`` turns back into a ready model."""
    save_weights(path, model.config, {**model_weights(model), **model_rope_freqs(model)})


def read_checkpoint(path, **config_overrides):
    """Read and check a checkpoint (a path, or a Hub repo id ``org/name[@revision]``): ``(config, float32 weights)``.

    A ``.npz`` file, or an mlx-lm model folder written by ``bdh-mlx convert --to-mlx-lm`` (``storage/mlx_lm.py``).

    ``weights`` also holds ``rope_freqs`` (N,) when the checkpoint stores per-neuron RoPE frequencies (merged models).

    ``config_overrides`` replace stored config fields that do not change shapes
    (e.g. ``dropout``, ``attention``, ``chunk_size``). The config is read first (at most
    ``CONFIG_MAX_BYTES``); every weight's declared size and header are checked against it before
    the weight is inflated; weights holding NaN or infinities are refused.
    """
    path = resolve_checkpoint(path)
    if path.is_dir():  # an mlx-lm model folder (bdh-mlx convert --to-mlx-lm)
        return mlx_lm.read_export(path, **config_overrides)
    with NpzReader(path, "checkpoint file") as npz:
        if CONFIG_KEY not in npz.names:
            raise CheckpointError(f"{path}: not a bdh-mlx checkpoint (it has no {CONFIG_KEY} entry)")
        check_format(path, npz)
        raw = npz.read(CONFIG_KEY, kinds="u", max_bytes=SMALL_ENTRY_BYTES + CONFIG_MAX_BYTES)
        config = read_config(path, raw, config_overrides)
        names = [name for name in npz.names if name not in (CONFIG_KEY, FORMAT_KEY)]
        expected = expected_arrays(config, names)
        check_names(path, "weights do not match the model", expected, names)
        for name, shape in expected.items():
            npz.check_declared_size(name, SMALL_ENTRY_BYTES + math.prod(shape) * 8, f"the config needs {shape}")
        check_weights(path, config, {name: npz.header(name) for name in expected})
        weights = {name: read_weight(npz, name) for name in expected}
    check_finite(path, weights)
    return config, weights


def load(path, compute_dtype=mx.float32, engine="auto", return_tokenizer: bool = False, **config_overrides):
    """A ready model, in eval mode, from a ``.npz`` checkpoint, an mlx-lm model folder or a Hub repo id (strict:
    every weight, right shapes).

    ``compute_dtype``: what the model computes in (the weights stay float32). ``engine``: the decoding
    engine (``bdh_mlx.inference.engines``); "auto" picks the fastest for the device, dtype and weights.
    With ``return_tokenizer``, ``(model, ByteTokenizer())``: the shape of mlx-lm's ``model, tokenizer = load(...)``
    (bdh-mlx's functions take text and need no tokenizer). Call ``model.train()`` before training it further
    (dropout is off in eval mode).
    """
    config, weights = read_checkpoint(path, **config_overrides)
    if engine == "auto":
        engine = choose_engine(config, compute_dtype)
    model = BDH(config, rope_freqs=weights.pop(ROPE_FREQS_KEY, None), compute_dtype=compute_dtype, engine=engine)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    model.eval()
    return (model, ByteTokenizer()) if return_tokenizer else model


def load_float(path) -> BDH:
    """Like ``load``, with a quantized checkpoint's weights dequantized to float32 (the values they stand for):
    for the commands that read or combine weights (``merge``, the interpret commands)."""
    model = load(path)
    if model.config.quantization is None:
        return model
    float_model = BDH(replace(model.config, quantization=None), rope_freqs=model._freqs)
    float_model.load_weights(list(dequantized_weights(model).items()), strict=True)
    mx.eval(float_model.parameters())
    return float_model.eval()
