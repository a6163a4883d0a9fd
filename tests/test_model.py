"""BDHConfig and the BDH module: presets, validation, parameters, dropout, bf16 compute."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import WEIGHT_NAMES
from mlx.utils import tree_flatten

import bdh_mlx.model as model_module
from bdh_mlx import BDH, PRESETS, BDHConfig, ConfigError
from bdh_mlx.model import dropout, random_keys
from bdh_mlx.storage.format import weight_shapes


def count(tree) -> int:
    """Number of scalars; sizes of lazy arrays are known without computing them."""
    return sum(v.size for _, v in tree_flatten(tree))


@pytest.mark.parametrize("name, expected", [("25m", 25_296_896), ("100m", 100_925_440)])
def test_published_parameter_counts(name, expected):
    config = BDHConfig.from_preset(name)
    m, D, V = config.mlp_internal_dim_multiplier, config.n_embd, config.vocab_size
    assert 3 * m * D * D + 2 * V * D == expected  # the paper's formula
    assert config.num_parameters == expected
    assert count(BDH(config).parameters()) == expected  # built lazily: nothing is computed


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_models_have_the_official_parameters(name):
    config = BDHConfig.from_preset(name)
    model = BDH(config)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert shapes == weight_shapes(config)
    assert set(shapes) == set(WEIGHT_NAMES)
    assert count(model.trainable_parameters()) == config.num_parameters


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        BDHConfig.from_preset("huge")
    assert str(e.value) == "unknown preset 'huge'; valid presets: tiny, small, 25m, 100m"
    assert set(PRESETS) == {"tiny", "small", "25m", "100m"}


def test_preset_overrides():
    config = BDHConfig.from_preset("25m", n_layer=2, dropout=0.0)
    assert (config.n_layer, config.dropout, config.n_embd, config.n_neurons) == (2, 0.0, 256, 8192)


def test_from_dict_ignores_unknown_keys():
    config = BDHConfig.from_dict({"n_layer": 3, "n_embd": 64, "block_size": 512, "lr": 1e-3})
    assert (config.n_layer, config.n_embd, config.n_head) == (3, 64, 4)
    assert BDHConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"n_embd": -8}, "n_embd must be a positive integer, got -8"),
        ({"n_head": 2.5}, "n_head must be a positive integer, got 2.5"),
        ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
        ({"mlp_internal_dim_multiplier": "4"}, "mlp_internal_dim_multiplier must be a positive integer, got '4'"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1"),
        ({"attention": "flash"}, "attention must be one of auto, parallel, chunked, got 'flash'"),
        ({"n_embd": 6, "n_head": 2, "mlp_internal_dim_multiplier": 1}, "must be even and positive for RoPE, got 3"),
        ({"n_layer": 10**9}, "n_layer must be at most 1,024, got 1000000000"),
        ({"n_layer": 10**30}, "n_layer must be at most 1,024, got about 2**99"),
        ({"n_embd": 65537}, "n_embd must be at most 65,536, got 65537"),
        ({"n_head": 1025}, "n_head must be at most 1,024, got 1025"),
        ({"vocab_size": 2**20 + 1}, "vocab_size must be at most 1,048,576, got 1048577"),
        ({"chunk_size": 2**20 + 1}, "chunk_size must be at most 1,048,576, got 1048577"),
        ({"mlp_internal_dim_multiplier": 65537}, "mlp_internal_dim_multiplier must be at most 65,536, got 65537"),
        # 3 * n_head * N * D with D = 2**16, N = 2**17: 3 * 2**33 weights, plus 2 * V * D
        ({"n_embd": 65536, "n_head": 1, "mlp_internal_dim_multiplier": 2},
         f"the config has {3 * 2**33 + 2 * 256 * 2**16:,} parameters, more than the 17,179,869,184 (2**34)"),
        ({"dropout": float("nan")}, "dropout must be in [0, 1), got nan"),
        ({"dropout": "0.1"}, "dropout must be in [0, 1), got '0.1'"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(ConfigError) as e:
        BDHConfig(**fields)
    assert message in str(e.value)


def test_rope_frequencies_are_a_constant_not_a_parameter():
    model = BDH(BDHConfig.from_preset("tiny"))
    assert model._freqs.shape == (model.config.n_neurons,)
    assert set(dict(tree_flatten(model.parameters()))) == set(WEIGHT_NAMES)
    assert set(dict(tree_flatten(model.trainable_parameters()))) == set(WEIGHT_NAMES)


def tiny_batch(config, B=2, T=12, seed=0):
    return mx.random.randint(0, config.vocab_size, (B, T), key=mx.random.key(seed))


def test_dropout_zeroes_p_and_scales_the_rest():
    x = mx.ones((2, 3, 64, 512))
    out = np.array(dropout(x, 0.3, random_keys(3)))
    assert abs((out == 0).mean() - 0.3) < 0.01  # 196,608 draws: the standard error is 0.001
    np.testing.assert_allclose(out[out != 0], 1 / 0.7, rtol=1e-6)


def test_a_share_of_the_batch_drops_its_rows_of_the_whole_batch():
    """Data-parallel processes: rows 3..5 of a batch of 8 get the masks one process with all 8 would draw."""
    x, keys = mx.ones((8, 2, 16, 64)), random_keys(2)
    whole = np.array(dropout(x, 0.4, keys))
    share = np.array(dropout(x[3:6], 0.4, keys, model_module.BatchShare(3, 8)))
    np.testing.assert_array_equal(share, whole[3:6])
    assert not np.array_equal(np.array(dropout(x[:3], 0.4, keys)), whole[3:6])  # without it: rows 0..2's masks


def test_the_model_drops_with_its_configured_rate(monkeypatch):
    rates = []
    real = model_module.dropout
    monkeypatch.setattr(model_module, "dropout", lambda x, p, keys, share: rates.append(p) or real(x, p, keys, share))
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.3)).train()
    model(tiny_batch(model.config))
    assert rates == [0.3] * model.config.n_layer


def test_dropout_only_in_train_mode():
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.5))
    idx = tiny_batch(model.config)
    model.train()
    a, b = model(idx)[0], model(idx)[0]
    assert not np.array_equal(np.array(a), np.array(b))
    model.eval()
    a, b = model(idx)[0], model(idx)[0]
    assert np.array_equal(np.array(a), np.array(b))


def test_loss_is_the_mean_cross_entropy():
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.0))
    idx, targets = tiny_batch(model.config), tiny_batch(model.config, seed=1)
    logits, loss = model(idx, targets)
    logits, targets = np.array(logits, dtype=np.float64), np.array(targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    assert abs(loss.item() - want) < 1e-5
