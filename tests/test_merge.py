"""Model merging: exactness when one side is silent, RoPE frequencies kept per neuron, checkpoints, errors."""

import mlx.core as mx
import numpy as np
import pytest

import bdh_mlx
from bdh_mlx.errors import CheckpointError, ConfigError
from bdh_mlx.model import BDH, BDHConfig, rope_frequencies
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.convert import mlx_to_torch
from bdh_mlx.storage.format import ROPE_FREQS_KEY
from bdh_mlx.tools.merge import main as merge_main

T = 300  # longer than 256, so positions (and each neuron's RoPE frequency) matter


def tiny(multiplier=8, seed=0, **overrides):
    mx.random.seed(seed)
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.0, mlp_internal_dim_multiplier=multiplier, **overrides))
    mx.eval(model.parameters())
    return model.eval()


def logits(model, idx):
    return np.array(model(idx)[0])


@pytest.fixture
def idx():
    return mx.array(np.random.default_rng(0).integers(0, 256, (1, T)))


@pytest.mark.parametrize("silent", ["a", "b"])
def test_merged_logits_equal_the_active_model_when_the_other_encoder_is_zero(idx, silent):
    a, b = tiny(8, seed=1), tiny(4, seed=2)  # different N: B's neurons need frequencies of N = 64, not 192
    b.embed.weight, b.lm_head = a.embed.weight, a.lm_head
    quiet, active = (a, b) if silent == "a" else (b, a)
    quiet.encoder = mx.zeros_like(quiet.encoder)
    merged = bdh_mlx.merge(a, b).eval()
    assert merged.config.n_neurons == a.config.n_neurons + b.config.n_neurons
    np.testing.assert_allclose(logits(merged, idx), logits(active, idx), atol=1e-5)


def test_default_frequencies_for_the_merged_n_would_be_wrong(idx):
    """The guard on the test above: with rope_frequencies(N_a + N_b) the silent-A merge is no longer exact."""
    a, b = tiny(8, seed=1), tiny(4, seed=2)
    b.embed.weight, b.lm_head = a.embed.weight, a.lm_head
    a.encoder = mx.zeros_like(a.encoder)
    merged = bdh_mlx.merge(a, b).eval()
    merged._freqs = rope_frequencies(merged.config.n_neurons)
    assert np.abs(logits(merged, idx) - logits(b.eval(), idx)).max() > 1e-3


def test_weights_are_concatenated_per_head_and_embeddings_averaged():
    a, b = tiny(8, seed=1), tiny(4, seed=2)
    merged = bdh_mlx.merge(a, b)
    Na, Nb, D = a.config.n_neurons, b.config.n_neurons, a.config.n_embd
    for h in range(a.config.n_head):
        np.testing.assert_array_equal(np.array(merged.encoder[h, :, :Na]), np.array(a.encoder[h]))
        np.testing.assert_array_equal(np.array(merged.encoder_v[h, :, Na:]), np.array(b.encoder_v[h]))
        rows = np.array(merged.decoder).reshape(-1, Na + Nb, D)[h]
        np.testing.assert_array_equal(rows[:Na], np.array(a.decoder[h * Na : (h + 1) * Na]))
        np.testing.assert_array_equal(rows[Na:], np.array(b.decoder[h * Nb : (h + 1) * Nb]))
    np.testing.assert_allclose(np.array(merged.lm_head), (np.array(a.lm_head) + np.array(b.lm_head)) / 2)
    want = np.concatenate([np.array(rope_frequencies(Na)), np.array(rope_frequencies(Nb))])
    np.testing.assert_array_equal(np.array(merged._freqs), want)


def test_merged_checkpoint_carries_its_frequencies(tmp_path, idx):
    merged = bdh_mlx.merge(tiny(8, seed=1), tiny(4, seed=2)).eval()
    checkpoint.save(merged, tmp_path / "ab.npz")
    checkpoint.save(tiny(8), tmp_path / "plain.npz")
    assert ROPE_FREQS_KEY in read_checkpoint(tmp_path / "ab.npz")[1]
    assert ROPE_FREQS_KEY not in np.load(tmp_path / "plain.npz").files  # default frequencies are not stored
    loaded = checkpoint.load(tmp_path / "ab.npz").eval()
    np.testing.assert_array_equal(np.array(loaded._freqs), np.array(merged._freqs))
    np.testing.assert_array_equal(logits(loaded, idx), logits(merged, idx))


def test_bad_frequencies_in_a_checkpoint_are_refused(tmp_path):
    checkpoint.save(tiny(8), tmp_path / "m.npz")
    arrays = dict(np.load(tmp_path / "m.npz"))
    np.savez(tmp_path / "bad.npz", **arrays, rope_freqs=np.ones(3, np.float32))
    with pytest.raises(CheckpointError, match=r"rope_freqs has shape \(3,\), but the config needs \(128,\)"):
        checkpoint.load(tmp_path / "bad.npz")


def test_converting_a_merged_model_to_torch_is_refused(tmp_path):
    checkpoint.save(bdh_mlx.merge(tiny(8), tiny(8)), tmp_path / "ab.npz")
    with pytest.raises(CheckpointError, match="official code computes them from N and cannot hold these"):
        mlx_to_torch(tmp_path / "ab.npz", tmp_path / "ab.pt")
    assert not (tmp_path / "ab.pt").exists()


def test_models_that_cannot_merge():
    with pytest.raises(ConfigError, match=r"cannot merge: n_layer differs \(2 vs 3\)"):
        bdh_mlx.merge(tiny(8), tiny(8, n_layer=3))
    odd = dict(n_embd=10, n_head=4)  # N = 5 * 10 // 4 = 12 each, but 10 * 10 // 4 = 25
    with pytest.raises(ConfigError, match=r"cannot merge: N = 12 \+ 12 is not"):
        bdh_mlx.merge(tiny(5, **odd), tiny(5, **odd))


def test_merge_command(tmp_path, capsys):
    checkpoint.save(tiny(8, seed=1), tmp_path / "a.npz")
    checkpoint.save(tiny(4, seed=2), tmp_path / "b.npz")
    checkpoint.save(tiny(8, n_embd=64), tmp_path / "wide.npz")
    assert merge_main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "ab.npz")]) == 0
    assert checkpoint.load(tmp_path / "ab.npz").config.n_neurons == 192
    assert merge_main([str(tmp_path / "a.npz"), str(tmp_path / "wide.npz"), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err == "bdh-mlx merge: error: cannot merge: n_embd differs (32 vs 64)\n"
    assert not (tmp_path / "x.npz").exists()
