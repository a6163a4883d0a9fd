import json
import math
import os
import signal
import sys
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import TINY_RUN
from mlx.utils import tree_flatten

from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.training import train, trainer
from bdh_mlx.training.data import BatchSampler


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return read_checkpoint(path)[1]


def test_adamw_matches_pytorch_semantics():
    """Bias-corrected moments, decoupled weight decay, eps added to the corrected sqrt(v)."""
    rng = np.random.default_rng(0)
    p0 = {"w": rng.normal(size=(3, 4)), "tiny": rng.normal(size=(5,))}  # "tiny" gets ~1e-9 grads: eps matters
    grads = [{"w": rng.normal(size=(3, 4)) * s, "tiny": rng.normal(size=(5,)) * 1e-9} for s in (1.0, 0.1, 0.5)]
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8

    optimizer = trainer.make_optimizer(lr, weight_decay=wd)
    params = {k: mx.array(v.astype(np.float32)) for k, v in p0.items()}
    ref = {k: (v.astype(np.float32).astype(np.float64), np.zeros_like(v), np.zeros_like(v)) for k, v in p0.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: v.astype(np.float32) for k, v in g.items()}
        params = optimizer.apply_gradients({k: mx.array(v) for k, v in g.items()}, params)
        for k, (p, m, v) in ref.items():
            p = p * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g[k]
            v = b2 * v + (1 - b2) * g[k].astype(np.float64) ** 2
            p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            ref[k] = p, m, v
            np.testing.assert_allclose(np.array(params[k]), p, rtol=1e-5, atol=1e-6)  # updates are ~1e-3..1e-2


def test_warmup_then_cosine_schedule():
    schedule = trainer.make_schedule(1e-3, steps=110, schedule="cosine", warmup_steps=10, min_lr=1e-4)
    for step, expected in [(0, 0.0), (5, 5e-4), (10, 1e-3), (60, 1e-4 + 0.9e-3 * 0.5), (110, 1e-4), (200, 1e-4)]:
        assert schedule(mx.array(step)).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    linear = trainer.make_schedule(1e-3, steps=100, schedule="linear", warmup_steps=0, min_lr=0.0)
    assert linear(mx.array(25)).item() == pytest.approx(7.5e-4, rel=1e-5)


def test_gradient_accumulation_equals_the_large_batch():
    config = BDHConfig.from_preset("tiny", dropout=0.0)
    batch = np.random.default_rng(1).integers(0, 256, size=(4, 17)).astype(np.uint8)
    results = []
    for accum in (1, 2):
        mx.random.seed(0)
        model = BDH(config)
        optimizer = optim.SGD(learning_rate=1.0)  # the update is the gradient itself
        step, state = trainer.make_train_step(model, optimizer, grad_accum=accum)
        loss, norm = step(mx.array(batch.reshape(accum, 4 // accum, 17)))
        mx.eval(state, loss, norm)
        results.append((loss.item(), norm.item(), {k: np.array(v) for k, v in tree_flatten(model.parameters())}))
    (loss1, norm1, w1), (loss2, norm2, w2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-4)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-7)


def test_loss_falls_on_a_repetitive_corpus(tmp_path, corpus_file):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "60", "--lr", "3e-3",
                "--eval-every", "30", "--log-every", "10"])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40, 50, 60]  # the first loss at once
    assert records[-1]["train_loss"] < 0.75 * records[0]["train_loss"]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert evals[1]["val_bpb"] == pytest.approx(evals[1]["val_loss"] / math.log(2))
    assert len(evals[1]["sparsity_x"]) == 2 and all(0 < s <= 1 for s in evals[1]["sparsity_y"])
    best = json.loads((out / "best.json").read_text())
    assert best == {"val_loss": evals[1]["val_loss"], "step": 60}
    for name in ("best.npz", "last.npz", "step_0000060.npz"):  # each a checkpoint of its own
        assert read_checkpoint(out / name)[0].n_embd == 32


# --- Exact resume -------------------------------------------------------------------------

RESUME_RUN = [*TINY_RUN, "--dropout", "0.2", "--log-every", "1", "--schedule", "cosine", "--warmup-steps", "3",
              "--decay-steps", "16", "--grad-accum", "2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(120)))
    return path


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, resume_corpus):
    out = tmp_path_factory.mktemp("one_go") / "run"
    train.main([*RESUME_RUN, "--data", str(resume_corpus), "--out", str(out), "--steps", "16", "--eval-every", "0",
                "--save-every", "0"])
    return out


def assert_same_run(run, reference):
    ours, theirs = metrics(run), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, 17))
    for key in ("train_loss", "grad_norm", "lr"):
        assert [r[key] for r in ours] == [r[key] for r in theirs], key
    assert ours[-1]["val_loss"] == theirs[-1]["val_loss"]
    a, b = weights(run / "last.npz"), weights(reference / "last.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)
    with np.load(run / "last.optimizer.npz") as f, np.load(reference / "last.optimizer.npz") as g:
        assert sorted(f.files) == sorted(g.files) and all(np.array_equal(f[k], g[k]) for k in f.files)


def test_resume_is_bit_identical(tmp_path, resume_corpus, one_go):
    out = tmp_path / "run"
    # The first half evaluates and samples at its end: neither may change the training randomness.
    train.main([*RESUME_RUN, "--data", str(resume_corpus), "--out", str(out), "--steps", "8", "--eval-every", "0",
                "--save-every", "3", "--sample-tokens", "16"])
    assert sorted(p.name for p in out.glob("step_*.json")) == [f"step_{s:07d}.json" for s in (3, 6, 8)]
    assert "sample" in metrics(out)[-1]
    train.main(["--resume", str(out), "--steps", "16", "--sample-tokens", "0"])
    assert_same_run(out, one_go)
    # step 8 was only a resume point: superseded, it is gone; the periodic checkpoints stay.
    assert sorted(p.name for p in out.glob("step_*[0-9].npz")) == [f"step_{s:07d}.npz" for s in (3, 6, 9, 12, 15, 16)]
    assert json.loads((out / "last.json").read_text())["step"] == 16


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, resume_corpus, one_go, monkeypatch, capsys):
    out = tmp_path / "run"
    sample, calls = BatchSampler.sample, []

    def interrupting_sample(self, n):
        calls.append(n)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 6 runs (the watcher thread answers it)
            time.sleep(0.5)
        return sample(self, n)

    monkeypatch.setattr(BatchSampler, "sample", interrupting_sample)
    code = train.main([*RESUME_RUN, "--data", str(resume_corpus), "--out", str(out), "--steps", "16",
                       "--eval-every", "0", "--save-every", "0"])
    assert code == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing this step, then saving" in err
    assert f"stopped at step 6; saved {out / 'last.npz'}; continue with: bdh-mlx train --resume {out}" in err
    assert json.loads((out / "last.json").read_text())["step"] == 6
    monkeypatch.setattr(BatchSampler, "sample", sample)
    train.main(["--resume", str(out)])
    assert_same_run(out, one_go)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "4", "--save-every", "2"])
    good = (out / "last.npz").read_bytes()
    loss_fn = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda model, batch: loss_fn(model, batch) * float("nan"))
    capsys.readouterr()
    code = train.main(["--resume", str(out), "--steps", "8"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("bdh-mlx train: resuming at step 4")
    assert err[1] == (f"bdh-mlx train: error: the loss became nan (grad norm nan) in steps 5-6; stopped, "
                      f"the last good checkpoint is {out / 'last.npz'} (step 4)")
    assert (out / "last.npz").read_bytes() == good
    assert json.loads((out / "last.json").read_text())["step"] == 4


def test_init_from_and_config_file(tmp_path, corpus_file):
    base = tmp_path / "base"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(base), "--steps", "2", "--n-layer", "3"])
    config = tmp_path / "run.toml"
    config.write_text('steps = 2\nlr = 0.0005\nblock-size = 16\ndropout = 0.0\nschedule = "linear"\n')
    args = train.parse_args(["--config", str(config), "--lr", "1e-4"])
    assert (args.steps, args.lr, args.block_size, args.schedule) == (2, 1e-4, 16, "linear")  # flags win
    out = tmp_path / "tuned"
    no_preset = TINY_RUN[2:]  # the checkpoint holds the config
    train.main([*no_preset, "--config", str(config), "--data", str(corpus_file), "--out", str(out),
                "--init-from", str(base / "last.npz")])
    tuned, _ = read_checkpoint(out / "last.npz")
    assert tuned.n_layer == 3 and tuned.dropout == 0.0  # config from the checkpoint, dropout from the file


# --- Bad input: one line, exit 2, nothing written --------------------------------------------


BAD_INPUT_CASES = [
    (["--data", "empty.txt"], "empty.txt: the corpus is empty (0 bytes)"),
    (["--data", "short.txt", "--block-size", "64"],
     "short.txt: the validation part has 30 bytes, fewer than one block of block_size + 1 = 65 bytes"),
    (["--data", "missing.txt"], "missing.txt: no such file or folder"),
    (["--dataset", "nums"], "nums: no string column; pick the text with --text-field; columns: n (int64)"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--block-size", "-3"], "argument --block-size: must be a positive integer, got -3"),
    (["--lr", "0"], "argument --lr: must be a positive number, got 0"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge' (choose from 'tiny', 'small', '25m', '100m')"),
    (["--resume", "norun"], "norun: no resume state (no last.json)"),
    (["--config", "bad.toml"], "bad.toml: unknown option 'stepz'"),
    (["--schedule", "cosine", "--warmup-steps", "10", "--steps", "10"], "leaves no steps for the cosine decay"),
    (["--wandb", "proj"], "--wandb needs the wandb package: pip install wandb"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 4611686018427387904], got -1"),
    (["--seed", str(2**70)], "--seed: must be an integer in [0, 4611686018427387904], got 1180591620717411303424"),
    (["--lr", "inf"], "argument --lr: must be a positive number, got inf"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a non-negative number, got inf"),
    (["--grad-clip", "nan"], "argument --grad-clip: must be a positive number, got nan"),
    (["--sample-prompt", ""], "--sample-prompt is empty; give at least one character (or --sample-tokens 0)"),
    (["--batch-size", "100000000"], "a training step needs about"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT_CASES, ids=[" ".join(a) for a, _ in BAD_INPUT_CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"x" * 300)
    datasets.Dataset.from_dict({"n": [1, 2, 3]}).save_to_disk(str(tmp_path / "nums"))
    (tmp_path / "norun").mkdir()
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = train.main(["--preset", "tiny", "--block-size", "32", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bdh-mlx train: error: "), err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no cache
    assert not any((tmp_path / "norun").iterdir())


def test_refuses_to_overwrite_a_run(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    code = train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err == (f"bdh-mlx train: error: {out} already holds a run; continue it with "
                                       f"--resume {out}, or choose another --out\n")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == "precious\n"
