"""mlx-lm model folders: ``bdh-mlx convert --to-mlx-lm CKPT --out DIR`` writes one, ``read_export`` reads it back.

A folder holds ``config.json`` (mlx-lm's keys, the whole BDH config under ``"bdh"``, and ``model_file``),
``model.safetensors`` (the weights under their official names, as in ``.npz`` checkpoints), a byte-level
``tokenizer.json`` whose token ids are the byte values, and ``bdh_model.py``: two lines importing the adapter
from the installed ``bdh_mlx`` (``bdh_mlx.inference.mlx_lm_model``), which is what ``--trust-remote-code`` runs.

bdh-mlx itself never runs a folder's model file: ``read_export`` reads ``config.json`` and the safetensors
strictly (names, shapes, dtypes and sizes checked from the header before any weight is read).
"""

import json
import math
import string
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bdh_mlx.errors import CheckpointError, ConfigError
from bdh_mlx.storage.files import atomic_write, atomic_write_text, check_names, make_dirs
from bdh_mlx.storage.format import (
    CONFIG_MAX_BYTES,
    check_finite,
    check_weights,
    config_from_stored,
    expected_arrays,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "bdh_model.py"
BDH_KEY = "bdh"  # config.json's entry holding the whole BDHConfig
FORMAT_KEY = "bdh_mlx_format"
FORMAT_VERSION = 1
BYTES = 256
HEADER_MAX_BYTES = 1 << 20  # a safetensors header: a few hundred bytes per weight
TOKENIZER_MAX_BYTES = 1 << 20
# safetensors dtype -> (the numpy dtype of its bytes, the dtype its values are read as)
SAFETENSORS_DTYPES = {
    "F32": (np.dtype("<f4"), np.dtype(np.float32)),
    "F16": (np.dtype("<f2"), np.dtype(np.float32)),
    "BF16": (np.dtype("<u2"), np.dtype(np.float32)),
    "U32": (np.dtype("<u4"), np.dtype(np.uint32)),
}
MODEL_SOURCE = '''"""A bdh-mlx model for mlx-lm: with --trust-remote-code, mlx-lm runs these lines, which take the model
from the installed bdh-mlx package (pip install "bdh-mlx[mlx-lm]"): bdh_mlx/inference/mlx_lm_model.py."""

from bdh_mlx.inference.mlx_lm_model import Model, ModelArgs  # noqa: F401
'''


# --- The byte-level tokenizer -------------------------------------------------------


def byte_characters() -> list:
    """The printable stand-in of each byte in byte-level tokenizers (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(BYTES) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(BYTES + i) for i, b in enumerate(others)}
    return [table[b] for b in range(BYTES)]


def end_token(end: str) -> dict:
    """Token 256, the end of a response of an instruction-tuned model: its marker as one special token (for
    mlx-lm's end-of-sequence), which the model never reads nor writes: the adapter gives it after the marker."""
    return {"id": BYTES, "content": end, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def tokenizer_json(end: str | None = None) -> dict:
    """A Hugging Face ``tokenizers`` file where byte b is token b: byte-level BPE with no merges; with ``end``,
    the end-of-response token 256 (``end_token``).

    The decoder is the byte-level one inside a ``Sequence``, so that mlx-lm streams text with its
    ``NaiveStreamingDetokenizer`` (decoding whole lines, exact) rather than its BPE one, which drops a
    leading space.
    """
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    vocab = {c: b for b, c in enumerate(byte_characters())}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [] if end is None else [end_token(end)],
        "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [byte_level]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string expression (every character outside printable ASCII escaped)."""
    def escape(c):
        if c.isascii() and c.isprintable() and c not in "\"\\":
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
    return '"' + "".join(map(escape, text)) + '"'


def jinja_format(template: str, fields: dict) -> str:
    """A ``str.format`` template as Jinja output: its literal text, and each ``{name}`` as ``fields[name]``."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(jinja_literal(literal))
        if name is not None:
            parts.append(fields[name])
    return "{{ " + " ~ ".join(parts or ['""']) + " }}"


def chat_template(template: dict) -> str:
    """The stored prompt template as a chat template: the last message is the instruction, the earlier ones
    (``Role: content`` paragraphs, as ``history_text``) its input, as ``bdh-mlx chat --history`` does."""
    history = ("{%- set history = namespace(text='') -%}{%- for m in messages[:-1] -%}"
               "{%- set history.text = history.text ~ ('\\n\\n' if not loop.first else '') ~ "
               "(m['role'] | capitalize) ~ ': ' ~ m['content'] -%}{%- endfor -%}")
    fields = {"instruction": "messages[-1]['content']", "input": "history.text"}
    return (f"{history}{{%- if history.text -%}}{jinja_format(template['prompt_input'], fields)}"
            f"{{%- else -%}}{jinja_format(template['prompt'], fields)}{{%- endif -%}}")


def tokenizer_config(config) -> dict:
    """``tokenizer_config.json``: no space clean-up; for a fine-tuned model a chat template, and the end-of-response
    token as end of sequence (text holding its marker is still read byte by byte: ``split_special_tokens``)."""
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "model_max_length": 2**60, "add_bos_token": False, "add_eos_token": False}
    if config.prompt_template is not None:
        settings["chat_template"] = chat_template(config.prompt_template)
        settings["eos_token"] = config.prompt_template["end"]
        settings["split_special_tokens"] = True
    return settings


def read_json(path: Path, max_bytes: int, too_large: str):
    """The JSON in ``path``, refused in one line when the file holds more than ``max_bytes`` or is not JSON."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size:,} bytes, {too_large}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None


def check_tokenizer(folder: Path, config):
    """Raise CheckpointError unless the folder's ``tokenizer.json`` (if any) maps each byte to its value."""
    path = folder / TOKENIZER_FILE
    if not path.exists():
        return
    stored = read_json(path, TOKENIZER_MAX_BYTES, "too large for a byte-level tokenizer")
    want = tokenizer_json(None if config.prompt_template is None else config.prompt_template["end"])
    model = stored.get("model") if isinstance(stored, dict) else None
    if not isinstance(model, dict) or model.get("vocab") != want["model"]["vocab"] or model.get("merges"):
        raise CheckpointError(f"{path}: not a byte-level tokenizer whose token ids are the byte values "
                              f"(bdh-mlx models read bytes; re-export with bdh-mlx convert --to-mlx-lm)")
    for key in ("pre_tokenizer", "decoder", "added_tokens", "normalizer"):
        if stored.get(key) != want[key]:
            raise CheckpointError(f"{path}: its {key} is not the byte-level one bdh-mlx writes "
                                  f"(re-export with bdh-mlx convert --to-mlx-lm)")


# --- safetensors, read strictly ----------------------------------------------------------


class TensorEntry(NamedTuple):
    """A tensor of a safetensors header: ``dtype`` is what its values are read as (for ``check_weights``)."""

    shape: tuple
    dtype: np.dtype
    stored: str
    begin: int
    end: int


def read_safetensors_header(path: Path, f, size: int) -> tuple:
    """``(tensors, where the data starts)`` of a safetensors file, checked: known dtypes, sizes that match the
    shapes, in bounds, no overlaps."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
    length = int.from_bytes(prefix, "little")
    if length > min(HEADER_MAX_BYTES, size - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header length {length:,} out of bounds)")
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries = {name: header_entry(path, name, spec, data_size) for name, spec in header.items()}
    spans = sorted((e.begin, e.end) for e in entries.values())
    if any(a_end > b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:], strict=False)):
        raise CheckpointError(f"{path}: tensors overlap in the safetensors data")
    return entries, 8 + length


def int_list(value) -> bool:
    return isinstance(value, list) and all(type(i) is int and 0 <= i < 2**62 for i in value)


def header_entry(path: Path, name: str, spec, data_size: int) -> TensorEntry:
    """One tensor's header, checked: a known dtype, a shape of non-negative ints, offsets inside the data."""
    if not isinstance(spec, dict) or spec.get("dtype") not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: {name}: dtype {spec.get('dtype') if isinstance(spec, dict) else spec!r} "
                              f"is not one of {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not int_list(shape) or not int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: {name}: bad shape {shape!r} or data offsets {offsets!r}")
    if offsets[1] > data_size:
        raise CheckpointError(f"{path}: {name} ends at byte {offsets[1]:,} of the data, which holds {data_size:,} "
                              f"(a truncated file)")
    raw, dtype = SAFETENSORS_DTYPES[spec["dtype"]]
    if math.prod(shape) * raw.itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(f"{path}: {name}: {offsets[1] - offsets[0]:,} bytes do not hold shape {shape}")
    return TensorEntry(tuple(shape), dtype, spec["dtype"], *offsets)


def read_tensor(f, data_start: int, entry: TensorEntry) -> np.ndarray:
    """One tensor's values: float32 for the float dtypes, uint32 for quantized values."""
    raw = SAFETENSORS_DTYPES[entry.stored][0]
    f.seek(data_start + entry.begin)
    values = np.frombuffer(f.read(entry.end - entry.begin), dtype=raw).reshape(entry.shape)
    if entry.stored == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(entry.dtype)


def write_safetensors(path, arrays: dict):
    """numpy arrays (float32 or uint32) as one safetensors file, atomically."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.uint32): "U32"}
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(len(text).to_bytes(8, "little") + text)
        for array in arrays.values():
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())

    atomic_write(path, write)


# --- Export and import ----------------------------------------------------------------


def mlx_lm_config(config) -> dict:
    """config.json: the keys mlx-lm reads, the sizes under their usual names, and the whole BDH config.

    No ``model_type``: mlx-lm needs none with a ``model_file``, and transformers (loading the tokenizer) warns
    about one it does not know.
    """
    return {
        "architectures": ["BDH"], "model_file": MODEL_FILE, FORMAT_KEY: FORMAT_VERSION,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, BDH_KEY: config.to_dict(),
    }


def write_export(config, weights: dict, out, source="") -> list:
    """Write the mlx-lm model folder of ``config`` and its float32 ``weights`` (as ``read_checkpoint`` gives them)
    into ``out``; returns the files written. ``source`` names the checkpoint in messages."""
    if config.vocab_size != BYTES:
        raise ConfigError(f"{source}: vocab_size is {config.vocab_size}; an mlx-lm export needs the {BYTES} "
                          f"byte tokens")
    out = Path(out)
    make_dirs(out)
    write_safetensors(out / WEIGHTS_FILE, weights)
    end = None if config.prompt_template is None else config.prompt_template["end"]
    files = {CONFIG_FILE: mlx_lm_config(config), TOKENIZER_FILE: tokenizer_json(end),
             TOKENIZER_CONFIG_FILE: tokenizer_config(config)}
    for name, content in files.items():
        atomic_write_text(out / name, json.dumps(content, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / MODEL_FILE, MODEL_SOURCE)
    return [out / name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, MODEL_FILE)]


def read_export_config(folder: Path, overrides: dict):
    """The BDHConfig of a folder's ``config.json``; a clear error for a folder that is not a bdh-mlx export."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: a folder with neither model.npz nor {CONFIG_FILE}: not a bdh-mlx model")
    stored = read_json(path, CONFIG_MAX_BYTES, "more than a model config holds")
    if not isinstance(stored, dict) or not isinstance(stored.get(BDH_KEY), dict):
        kind = f" (model_type {stored['model_type']!r})" if isinstance(stored, dict) and "model_type" in stored else ""
        raise CheckpointError(f"{folder}: not a bdh-mlx model folder{kind}: its {CONFIG_FILE} has no "
                              f"{BDH_KEY!r} entry (write one with bdh-mlx convert --to-mlx-lm)")
    version = stored.get(FORMAT_KEY)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: {FORMAT_KEY} is {version!r}; this bdh-mlx reads format {FORMAT_VERSION} "
                              f"(pip install -U bdh-mlx)")
    return config_from_stored(path, stored[BDH_KEY], overrides)


def read_export(folder, **config_overrides):
    """``(config, weights)`` of an mlx-lm folder written by ``export``, as ``read_checkpoint`` gives them."""
    folder = Path(folder)
    config = read_export_config(folder, config_overrides)
    check_tokenizer(folder, config)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    size = path.stat().st_size
    with path.open("rb") as f:
        entries, data_start = read_safetensors_header(path, f, size)
        expected = expected_arrays(config, entries)
        check_names(path, "weights do not match the model", expected, entries)
        check_weights(path, config, entries)
        weights = {name: read_tensor(f, data_start, entries[name]) for name in expected}
    check_finite(path, weights)
    return config, weights
