import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_RUN

from bdh_mlx import load
from bdh_mlx.tools import plot
from bdh_mlx.training import evaluate, train
from bdh_mlx.training.data import eval_batches

EVAL_SHAPE = ["--block-size", "32", "--batch-size", "4", "--eval-batches", "2"]


@pytest.fixture
def finished_run(tmp_path, corpus_file):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "6", "--dropout", "0.5",
                "--eval-every", "3", "--log-every", "1"])
    return out


def test_eval_command_is_deterministic_and_matches_training(finished_run, corpus_file, capsys):
    # Without --block-size and --batch-size, eval takes those the run trained with (32 x 4, from TINY_RUN).
    args = evaluate.build_parser().parse_args(
        ["--checkpoint", str(finished_run / "last.npz"), "--data", str(corpus_file), "--eval-batches", "2"]
    )
    first, second = evaluate.run(args), evaluate.run(args)  # dropout 0.5 in the config: must be off
    assert first == second
    final = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("val_loss", "val_bpb", "sparsity_x", "sparsity_y"):
        assert first[key] == final[key], key  # the same function, batches and weights as in training
    out = capsys.readouterr().out
    assert f"val loss {final['val_loss']:.4f} | bits per byte {final['val_bpb']:.4f}" in out
    assert "(2 x 4 x 32 bytes, as its run trained)" in out


def test_sparsity_counts_nonzero_activations(finished_run, corpus_file):
    model = load(finished_run / "last.npz")
    data = np.frombuffer(corpus_file.read_bytes(), dtype=np.uint8)
    batch = eval_batches(data, 2, 16, 1)[0]
    model.eval()
    acts = []
    model(mx.array(batch[:, :-1], dtype=mx.int32), activations=acts)
    expected_x = [np.count_nonzero(np.array(a["x"])) / np.array(a["x"]).size for a in acts]
    expected_y = [np.count_nonzero(np.array(a["y"])) / np.array(a["y"]).size for a in acts]
    model.train()
    x, y = evaluate.activation_sparsity(model, batch)
    np.testing.assert_allclose(x, expected_x, rtol=1e-6)
    np.testing.assert_allclose(y, expected_y, rtol=1e-6)
    assert model.training  # the mode is restored


def test_eval_bad_input(tmp_path, corpus_file, capsys):
    code = evaluate.main(["--checkpoint", str(tmp_path / "none.npz"), "--data", str(corpus_file)])
    assert code == 2
    assert capsys.readouterr().err == f"bdh-mlx eval: error: {tmp_path / 'none.npz'}: no such checkpoint file\n"


def test_plot_writes_pngs(finished_run, tmp_path, capsys):
    plot.main([str(finished_run), "--out", str(tmp_path / "charts")])
    names = ["loss.png", "bpb.png", "lr.png", "sparsity.png"]  # in this order
    assert capsys.readouterr().out.split() == [str(tmp_path / "charts" / n) for n in names]
    for name in names:
        assert (tmp_path / "charts" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = plot.main([str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"bdh-mlx plot: error: {tmp_path}: no metrics.jsonl (is it a bdh-mlx run folder?)\n"


def test_plot_out_under_a_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0, "lr": 0.001}\n')
    (tmp_path / "file").write_text("kept")
    assert plot.main([str(run), "--out", str(tmp_path / "file" / "charts")]) == 2
    assert capsys.readouterr().err == f"bdh-mlx plot: error: {tmp_path / 'file' / 'charts'}: Not a directory\n"
    assert plot.main([str(run), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"bdh-mlx plot: error: {tmp_path / 'file'}: Not a directory\n"
    assert (tmp_path / "file").read_text() == "kept"


def test_plot_before_the_first_evaluation_draws_what_exists(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0, "lr": 0.001}\n'
                                       '{"step": 10, "train_loss": 4.0, "lr": 0.001}\n{"step": 2')  # torn last line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib warning (e.g. an empty legend)
        assert plot.main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(run / "loss.png"), str(run / "lr.png")]
    assert err == (f"bdh-mlx plot: {run} has no evaluation yet (up to step 10): bpb.png and sparsity.png are drawn "
                   f"after the first one\n")
