"""Checkpoints: round trip, layout, atomic writes, and every bad input raising one clear CheckpointError."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import WEIGHT_NAMES

import bdh_mlx
from bdh_mlx import BDH, BDHConfig, CheckpointError
from bdh_mlx.storage.format import CONFIG_KEY, FORMAT_KEY, model_weights, save_weights, weight_shapes

TINY = BDHConfig.from_preset("tiny", dropout=0.0)


@pytest.fixture(scope="module")
def model():
    return BDH(TINY).eval()


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "model.npz"
    bdh_mlx.save(model, path)
    return path


def test_round_trip_gives_identical_logits(model, saved):
    idx = mx.random.randint(0, model.config.vocab_size, (2, 9), key=mx.random.key(0))
    loaded = bdh_mlx.load(saved).eval()
    assert loaded.config == model.config
    assert np.array_equal(np.array(loaded(idx)[0]), np.array(model(idx)[0]))


def test_layout_is_the_official_names_plus_the_config(model, saved):
    with np.load(saved, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert set(arrays) == set(WEIGHT_NAMES) | {CONFIG_KEY, FORMAT_KEY}  # no attn.freqs, no _freqs
    assert json.loads(arrays[CONFIG_KEY].tobytes().decode("utf-8")) == model.config.to_dict()
    for name, shape in weight_shapes(model.config).items():
        assert arrays[name].shape == shape and arrays[name].dtype == np.float32


def test_load_overrides_fields_that_keep_the_shapes(saved):
    loaded = bdh_mlx.load(saved, dropout=0.2, attention="chunked", chunk_size=4)
    assert (loaded.config.dropout, loaded.config.attention, loaded.config.chunk_size) == (0.2, "chunked", 4)


def test_write_leaves_no_temporary_files(saved):
    assert [p.name for p in saved.parent.iterdir()] == ["model.npz"]


def test_interrupted_write_keeps_the_old_file(model, saved, monkeypatch):
    before = saved.read_bytes()

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bdh_mlx.save(BDH(model.config), saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["model.npz"]


def truncated(path, model):
    bdh_mlx.save(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def with_weights(path, model, config=TINY, drop=(), **replace):
    weights = {k: v for k, v in model_weights(model).items() if k not in drop}
    save_weights(path, config, {**weights, **replace})


def with_config(path, model, text):
    """The model's weights with hand-made config bytes."""
    config = np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8)
    np.savez(path, **model_weights(model), **{CONFIG_KEY: config})


CONFIG_JSON = json.dumps(TINY.to_dict())

# case -> (make(path, model), what the message says after "<path>: ")
BAD_CHECKPOINTS = {
    "missing": (lambda p, m: None, "no such checkpoint file"),
    "directory": (lambda p, m: p.mkdir(), "a folder with neither model.npz nor config.json: not a bdh-mlx model"),
    "corrupt": (lambda p, m: p.write_bytes(b"\x00garbage" * 64), "not a readable .npz checkpoint file (not a zip"),
    "text file": (lambda p, m: p.write_text('{"step": 1}\n'), "not a readable .npz checkpoint file (not a zip"),
    "truncated": (truncated, "not a readable .npz checkpoint"),
    "foreign": (lambda p, m: np.savez(p, a=np.zeros(3)), f"not a bdh-mlx checkpoint (it has no {CONFIG_KEY} entry)"),
    "shapes": (
        lambda p, m: with_weights(p, m, config=BDHConfig.from_dict({**TINY.to_dict(), "n_embd": 64})),
        f"embed.weight has shape {(TINY.vocab_size, TINY.n_embd)}, but the config needs {(TINY.vocab_size, 64)}",
    ),
    "missing key": (
        lambda p, m: with_weights(p, m, drop=("decoder",)),
        "weights do not match the model: missing decoder",
    ),
    "extra key": (
        lambda p, m: with_weights(p, m, **{"attn.freqs": np.zeros((1, 1, 1, TINY.n_neurons), np.float32)}),
        "weights do not match the model: unexpected attn.freqs",
    ),
    "int weights": (
        lambda p, m: with_weights(p, m, lm_head=np.zeros((TINY.n_embd, TINY.vocab_size), np.int32)),
        "lm_head has dtype int32, expected floating point",
    ),
    "bad json": (lambda p, m: with_config(p, m, CONFIG_JSON[:-5]), "unreadable config"),
    "not utf-8": (lambda p, m: with_config(p, m, "\udcff{}"), "unreadable config"),
    "json list": (lambda p, m: with_config(p, m, "[1, 2]"), "unreadable config"),
    "bad value": (
        lambda p, m: with_config(p, m, json.dumps({**TINY.to_dict(), "n_layer": 0})),
        "invalid config: n_layer must be a positive integer, got 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_raise_one_clear_line(model, tmp_path, case):
    make, message = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.npz"
    make(path, model)
    with pytest.raises(CheckpointError) as e:
        bdh_mlx.load(path)
    text = str(e.value)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    assert message in text, text


def test_unknown_config_keys_are_ignored(model, tmp_path):
    path = tmp_path / "future.npz"
    with_config(path, model, json.dumps({**TINY.to_dict(), "rope_theta": 65536, "note": "from a newer version"}))
    assert bdh_mlx.load(path).config == model.config


def test_load_returns_an_eval_mode_model(saved):
    """Like mlx-lm's load: dropout is off when the model is called right after loading."""
    model = bdh_mlx.load(saved, dropout=0.5)
    assert model.training is False
    idx = mx.array([[1, 2, 3, 4]])
    assert np.array_equal(np.array(model(idx)[0]), np.array(model(idx)[0]))


def test_checkpoints_of_the_first_release_still_load(tmp_path):
    """Format 1 as first released: no quantization or prompt_template in its config."""
    model = BDH(BDHConfig.from_preset("tiny"))
    first_release = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization", "prompt_template")}
    arrays = {**model_weights(model), CONFIG_KEY: np.frombuffer(json.dumps(first_release).encode(), dtype=np.uint8),
              FORMAT_KEY: np.array(1, dtype=np.int32)}
    np.savez(tmp_path / "old.npz", **arrays)
    loaded = bdh_mlx.load(tmp_path / "old.npz")
    assert loaded.config == model.config and loaded.config.quantization is None
    idx = mx.array([[1, 2, 3]])
    assert np.array_equal(np.array(loaded(idx)[0]), np.array(model.eval()(idx)[0]))
