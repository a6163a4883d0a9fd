"""Quantized checkpoints through every command: merge and the interpret commands read the weights they stand
for, eval says at which batch shape it compares, and quantize picks a group size that fits the model."""

import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx import BDH, BDHConfig, cli, load, quantize, save
from bdh_mlx.storage.checkpoint import load_float, read_checkpoint
from bdh_mlx.storage.files import eval_mode

TINY = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float checkpoint and its 4-bit copy (embedding too)."""
    folder = tmp_path_factory.mktemp("q")
    mx.random.seed(5)
    model = BDH(BDHConfig(**TINY))
    save(model, folder / "float.npz")
    save(quantize(model, bits=4, group_size=32, embedding=True), folder / "q4.npz")
    return folder / "float.npz", folder / "q4.npz"


def stored_matrix(weights, name, group_size=32, bits=4):
    """M of a quantized weight, dequantized straight from the checkpoint's arrays."""
    arrays = (mx.array(weights[f"{name}.{part}"]) for part in ("weight_q", "scales", "biases"))
    return np.array(mx.dequantize(*arrays, group_size=group_size, bits=bits))


def test_load_float_gives_the_weights_the_quantized_ones_stand_for(files):
    _, q4 = files
    weights = read_checkpoint(q4)[1]
    model = load_float(q4)
    assert model.config.quantization is None
    nh, N, D = 2, 128, 32
    np.testing.assert_array_equal(np.array(model.encoder), stored_matrix(weights, "encoder").swapaxes(-1, -2))
    np.testing.assert_array_equal(np.array(model.encoder_v), stored_matrix(weights, "encoder_v").swapaxes(-1, -2))
    np.testing.assert_array_equal(np.array(model.decoder),
                                  stored_matrix(weights, "decoder").swapaxes(-1, -2).reshape(nh * N, D))
    np.testing.assert_array_equal(np.array(model.lm_head), stored_matrix(weights, "lm_head").T)
    np.testing.assert_array_equal(np.array(model.embed.weight), stored_matrix(weights, "embed"))
    tokens = mx.array([list(b"the quick brown fox")])
    quantized = load(q4)
    with eval_mode(model), eval_mode(quantized):
        np.testing.assert_allclose(np.array(model(tokens)[0]), np.array(quantized(tokens)[0]), atol=1e-4, rtol=1e-4)


def test_merge_a_quantized_checkpoint_with_a_float_one(files, tmp_path, capsys):
    float_path, q4 = files
    out = tmp_path / "merged.npz"
    assert cli.main(["merge", str(q4), str(float_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith("parameters, float32\n")
    merged, a, b = load(out), load_float(q4), load(float_path)
    assert merged.config.quantization is None and merged.config.n_neurons == 2 * b.config.n_neurons
    np.testing.assert_array_equal(np.array(merged.encoder), np.concatenate([a.encoder, b.encoder], axis=2))
    np.testing.assert_array_equal(np.array(merged.lm_head), (np.array(a.lm_head) + np.array(b.lm_head)) / 2)


@pytest.mark.parametrize("argv", [
    ["inspect", "--text", "hello there", "--no-progress", "--json", "{out}/stats.json", "--out", "{out}/r.html"],
    ["neurons", "--data", "{text}", "--no-progress", "--out", "{out}/atlas"],
    ["synapses", "--text", "hello there", "--no-progress"],
    ["graphs", "--json", "{out}/graphs.json"],
])
def test_interpret_commands_read_a_quantized_checkpoint_as_its_float_weights(files, tmp_path, capsys, argv):
    """Each command prints on a 4-bit checkpoint what it prints on the float weights that checkpoint stands for."""
    _, q4 = files
    text = tmp_path / "text.txt"
    text.write_text("hello there, general kenobi. " * 20)
    dequantized = tmp_path / "dequantized.npz"
    save(load_float(q4), dequantized)
    outputs = []
    for checkpoint in (q4, dequantized):
        out = tmp_path / checkpoint.stem
        out.mkdir()
        args = [a.format(out=out, text=text) for a in argv]
        assert cli.main([args[0], "--checkpoint", str(checkpoint), *args[1:]]) == 0
        outputs.append(capsys.readouterr().out.replace(str(out), "OUT"))
    assert outputs[0] == outputs[1] and outputs[0]


@pytest.mark.parametrize("n_embd, n_head, multiplier, group_size", [
    (32, 2, 8, 32),     # the README's quick-start model: N = 128, n_embd 32
    (64, 2, 8, 64),     # N = 256
    (96, 3, 4, 32),     # 96 = 3 * 32
    (128, 4, 8, 128),   # N = 256
    (128, 4, 2, 64),    # N = 64 limits it
])
def test_quantize_picks_the_largest_group_size_that_fits(tmp_path, capsys, n_embd, n_head, multiplier, group_size):
    config = dict(n_layer=1, n_embd=n_embd, n_head=n_head, mlp_internal_dim_multiplier=multiplier)
    save(BDH(BDHConfig(**config)), tmp_path / "f.npz")
    assert cli.main(["quantize", "--checkpoint", str(tmp_path / "f.npz"), "--bits", "4",
                     "--out", str(tmp_path / "q.npz")]) == 0
    assert f"4-bit, group size {group_size}," in capsys.readouterr().out
    assert load(tmp_path / "q.npz").config.quantization["group_size"] == group_size


def test_eval_says_at_which_batch_shape_it_compares(files, tmp_path, capsys):
    _, q4 = files
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["eval", "--checkpoint", str(q4), "--data", str(corpus), "--eval-batches", "1"]
    assert cli.main([*common, "--block-size", "16", "--batch-size", "2"]) == 0
    assert "(1 x 2 x 16 bytes, as given)" in capsys.readouterr().out
    assert cli.main([*common, "--block-size", "16"]) == 0
    assert ("(1 x 32 x 16 bytes, the default shape: no run folder beside the checkpoint; compare checkpoints at "
            "one --block-size and --batch-size)") in capsys.readouterr().out
