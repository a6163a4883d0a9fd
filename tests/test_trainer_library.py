"""The training library from Python: TrainingArgs + train(model, optimizer, train_set, val_set, args)."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_RUN

from bdh_mlx import quantize
from bdh_mlx.errors import ConfigError
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.training import train as train_command
from bdh_mlx.training.data import BatchSampler, eval_batches, load_corpus
from bdh_mlx.training.run_folder import RunFolder
from bdh_mlx.training.trainer import (
    TrainingArgs,
    TrainingError,
    check_same_run,
    make_optimizer,
    make_schedule,
    train,
)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def python_run(corpus_file, out, steps, decay_steps=None, **args):
    """The run ``bdh-mlx train --preset tiny --block-size 32 --batch-size 4 --eval-batches 2`` makes, from Python."""
    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("tiny"))
    corpus = load_corpus(out.parent / "cache", data=str(corpus_file))
    schedule = make_schedule(3e-3, steps, "cosine", warmup_steps=2, decay_steps=decay_steps)
    optimizer = make_optimizer(schedule, weight_decay=0.1)
    args = TrainingArgs(out=str(out), steps=steps, seed=0, sample_tokens=0, progress=False, **args)
    last = train(model, optimizer, BatchSampler(corpus.train, 4, 32, seed=0), eval_batches(corpus.val, 4, 32, 2), args)
    return model, last


def test_train_from_python_learns_and_writes_checkpoints(tmp_path, corpus_file):
    out = tmp_path / "run"
    model, last = python_run(corpus_file, out, 40, eval_every=20, log_every=10, save_every=20)
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40] and last == records[-1]
    assert records[-1]["train_loss"] < 0.75 * records[0]["train_loss"]
    assert records[-1]["val_loss"] < records[2]["val_loss"]
    config, weights = read_checkpoint(out / "last.npz")
    assert config == model.config
    assert all(np.array_equal(weights[k], np.array(v)) for k, v in model.parameters().items() if k != "embed")
    assert np.array_equal(weights["embed.weight"], np.array(model.embed.weight))
    assert sorted(p.name for p in out.glob("step_*[0-9].npz")) == ["step_0000020.npz", "step_0000040.npz"]
    saved = json.loads((out / "run.json").read_text())["args"]
    assert (saved["steps"], saved["batch_size"], saved["block_size"]) == (40, 4, 32)  # what eval reads back


def test_train_from_python_equals_the_command_bit_for_bit(tmp_path, corpus_file):
    cli, py = tmp_path / "cli", tmp_path / "py"
    flags = ["--steps", "8", "--lr", "3e-3", "--schedule", "cosine", "--warmup-steps", "2", "--dropout", "0.1",
             "--log-every", "1", "--eval-every", "4", "--grad-accum", "2", "--grad-clip", "0.5"]
    assert train_command.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(cli), *flags]) == 0
    python_run(corpus_file, py, 8, log_every=1, eval_every=4, grad_accum=2, grad_clip=0.5)
    assert [r["train_loss"] for r in metrics(py)] == [r["train_loss"] for r in metrics(cli)]
    assert [r.get("val_loss") for r in metrics(py)] == [r.get("val_loss") for r in metrics(cli)]
    a, b = read_checkpoint(py / "last.npz")[1], read_checkpoint(cli / "last.npz")[1]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_from_python_is_exact(tmp_path, corpus_file):
    one, two = tmp_path / "one", tmp_path / "two"
    run = dict(decay_steps=8, log_every=1, eval_every=0, save_every=0)
    python_run(corpus_file, one, 8, **run)
    python_run(corpus_file, two, 4, **run)
    python_run(corpus_file, two, 8, **run, resume=True)
    assert [r["train_loss"] for r in metrics(two)] == [r["train_loss"] for r in metrics(one)]
    a, b = read_checkpoint(one / "last.npz")[1], read_checkpoint(two / "last.npz")[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, corpus_file):
    out = tmp_path / "run"
    python_run(corpus_file, out, 3)
    before = (out / "last.npz").read_bytes()
    with pytest.raises(Exception, match="already holds a run; resume it, or choose another run folder"):
        python_run(corpus_file, out, 3)
    assert (out / "last.npz").read_bytes() == before


def test_processes_of_another_run_are_refused(tmp_path, monkeypatch):
    """Processes that joined the wrong ring (another launch on the same ports) disagree on the run: refused."""
    group = SimpleNamespace(size=lambda: 2)
    run, record = RunFolder(tmp_path / "run"), {"lr": 1e-3}

    def gathered(digests):
        monkeypatch.setattr(mx.distributed, "all_gather", lambda mine, group: mx.array(digests(int(mine.item()))))

    gathered(lambda mine: [mine, mine])
    check_same_run(group, run, 3, record)  # the same run: accepted
    gathered(lambda mine: [mine, mine + 1])
    with pytest.raises(TrainingError, match=f"the 2 processes are not all training {run.path} from step 3"):
        check_same_run(group, run, 3, record)


def test_a_quantized_model_is_refused_before_anything_is_written(tmp_path):
    model = BDH(BDHConfig.from_preset("tiny"))
    quantize(model, 8, 32, False)
    sampler = BatchSampler(np.zeros(100, np.uint8), 4, 8, seed=0)
    with pytest.raises(ConfigError, match="^a quantized model cannot be trained"):
        train(model, make_optimizer(1e-3), sampler, sampler.sample(2)[:, :, :9], TrainingArgs(out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
