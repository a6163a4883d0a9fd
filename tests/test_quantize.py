"""Quantized weights: the layouts, strict checkpoints, the command line, and inference-only use."""

import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx import BDH, BDHConfig, BDHError, CheckpointError, cli, load, quantize, save
from bdh_mlx.inference.engines import MLXDense, MLXSparse
from bdh_mlx.modeling.quantized import QuantizedWeight
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.format import model_weights, save_weights


def tiny_model(**overrides):
    mx.random.seed(3)
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.0, **overrides))
    model.eval()
    return model


def quantized_copy(model, bits, group_size=32, embedding=False):
    copy = BDH(model.config)
    copy.update(model.parameters())
    return quantize(copy, bits, group_size, embedding)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_matrix_is_the_transposed_weight_within_a_step(bits):
    w = np.random.default_rng(0).normal(size=(3, 64, 40)).astype(np.float32)  # (nh, in, out), groups along in
    q = QuantizedWeight.from_matrix(mx.array(w).swapaxes(-1, -2), group_size=32, bits=bits)
    got = np.array(q.dequantize()).swapaxes(-1, -2)
    groups = w.reshape(3, 2, 32, 40)  # per output column, two groups of 32 inputs
    step = (groups.max(axis=2) - groups.min(axis=2)) / (2**bits - 1)  # affine quantization step per group
    error = np.abs(got - w).reshape(3, 2, 32, 40).max(axis=2)
    assert (error <= step + 1e-6).all()  # at most one step: MLX shifts the grid so that 0 is exact
    assert error.max() > 0  # really quantized
    for shape in [(1, 3, 1, 64), (2, 3, 5, 64)]:  # MLX's quantized kernel (decoding), dequantized (many rows)
        x = mx.array(np.random.default_rng(1).normal(size=shape).astype(np.float32))
        np.testing.assert_allclose(np.array(q(x)), np.array(x) @ got, atol=1e-4, rtol=1e-4)


def test_quantized_checkpoint_round_trip(tmp_path):
    """Saved and loaded exactly; the logits' error against fp32 grows with the quantization step (17x at 4 bits)."""
    model = tiny_model()
    errors = {bits: round_trip_error(model, tmp_path, bits) for bits in (8, 4)}
    # Relative to the logits' spread (small for random weights, so LN amplifies); measured 0.05 and 0.77.
    assert 0 < errors[8] < 0.1 and errors[4] < 1.5
    assert 8 < errors[4] / errors[8] < 30  # (2^8 - 1) / (2^4 - 1) = 17


def round_trip_error(model, tmp_path, bits):
    """max |logits - fp32 logits| / std(fp32 logits) of the quantized model after a save and a strict load."""
    idx = mx.random.randint(0, 256, (2, 24), key=mx.random.key(5))
    reference = np.array(model(idx)[0])
    quantized = quantized_copy(model, bits, embedding=True)
    save(quantized, tmp_path / "q.npz")
    loaded = load(tmp_path / "q.npz")
    assert loaded.config.quantization == {"bits": bits, "group_size": 32, "embedding": True}
    assert not loaded.training
    logits = np.array(loaded(idx)[0])
    np.testing.assert_array_equal(logits, np.array(quantized(idx)[0]))
    save(model, tmp_path / "f.npz")
    fp32_bytes = (tmp_path / "f.npz").stat().st_size
    expected = fp32_bytes * (bits + 2 * 32 / 32) / 32  # the values, and a float32 scale and bias per 32 values
    assert abs((tmp_path / "q.npz").stat().st_size - expected) < 0.05 * fp32_bytes  # + npz headers: 15 files
    return np.abs(logits - reference).max() / reference.std()


def test_quantized_checkpoint_is_loaded_strictly(tmp_path):
    quantized = quantized_copy(tiny_model(), 4)
    weights = model_weights(quantized)
    assert weights["encoder.weight_q"].dtype == np.uint32 and weights["encoder.weight_q"].shape == (2, 128, 4)
    path = tmp_path / "q.npz"
    save_weights(path, quantized.config, {k: v for k, v in weights.items() if k != "decoder.scales"})
    with pytest.raises(CheckpointError, match="missing decoder.scales"):
        read_checkpoint(path)
    save_weights(path, quantized.config, {**weights, "encoder.weight_q": weights["encoder.weight_q"] * 1.0})
    with pytest.raises(CheckpointError, match="encoder.weight_q has dtype float64, expected uint32"):
        read_checkpoint(path)
    save_weights(path, quantized.config, {**weights, "encoder": np.zeros((2, 32, 128), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected encoder$"):
        read_checkpoint(path)


def test_a_quantized_model_is_not_trained():
    quantized = quantized_copy(tiny_model(), 8)
    quantized.train()
    with pytest.raises(BDHError, match="a quantized model is for inference only"):
        quantized(mx.zeros((1, 4), dtype=mx.int32))
    with pytest.raises(BDHError, match="already quantized"):
        quantize(quantized)


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv]) or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, message", [
    (["--bits", "3"], "quantization bits must be 4 or 8, got 3"),
    (["--bits", "4", "--group-size", "48"], "quantization group size must be 32, 64 or 128, got 48"),
    (["--bits", "4", "--group-size", "64"], "quantization group size 64 does not divide n_embd (32); choose one of 32"),
])
def test_quantize_command_bad_input(tmp_path, capsys, flags, message):
    save(tiny_model(), tmp_path / "f.npz")
    code, _, err = run_cli(["quantize", "--checkpoint", tmp_path / "f.npz", *flags, "--out", tmp_path / "q.npz"],
                           capsys)
    assert (code, err) == (2, f"bdh-mlx quantize: error: {message}\n")
    assert not (tmp_path / "q.npz").exists()


def test_quantized_checkpoint_through_the_commands(tmp_path, capsys):
    save(tiny_model(), tmp_path / "f.npz")
    code, out, _ = run_cli(["quantize", "--checkpoint", tmp_path / "f.npz", "--bits", "8", "--group-size", "32",
                            "--out", tmp_path / "q.npz"], capsys)
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'q.npz'}: 8-bit, group size 32")
    code, out, _ = run_cli(["generate", "--checkpoint", tmp_path / "q.npz", "-p", "ab", "-m", "3", "--temp", "0"],
                           capsys)
    expected = greedy(load(tmp_path / "q.npz"), b"ab", 3).decode("utf-8", "replace")
    assert code == 0 and out == expected + "\n"
    code, _, err = run_cli(["convert", "--to-torch", tmp_path / "q.npz", "--out", tmp_path / "q.pt"], capsys)
    assert (code, err) == (2, f"bdh-mlx convert: error: {tmp_path / 'q.npz'}: a 8-bit quantized checkpoint; "
                              "the official format needs the float checkpoint it was quantized from\n")


def greedy(model, prompt: bytes, n: int) -> bytes:
    """Prompt and greedy continuation by full forward passes (no cache): an independent check of generate."""
    tokens = list(prompt)
    for _ in range(n):
        logits, _ = model(mx.array([tokens]))
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
    return bytes(tokens)


def test_a_quantized_model_decodes_with_the_dense_step_whatever_the_density():
    """Quantized weights have no rows to gather: decoding one byte at a time still equals the full pass."""
    mx.random.seed(2)
    model = quantize(BDH(BDHConfig.from_preset("tiny", dropout=0.0), engine=MLXSparse(1.0)), bits=8, group_size=32)
    assert isinstance(model.engine, MLXDense)  # chosen again by quantize, whatever the model had
    idx = mx.random.randint(0, 256, (1, 10), key=mx.random.key(3))
    cache = model.make_cache(1)
    steps = mx.concatenate([model(idx[:, t : t + 1], cache=cache)[0] for t in range(10)], axis=1)
    np.testing.assert_allclose(np.array(steps), np.array(model(idx)[0]), atol=1e-4, rtol=1e-4)
