"""Each training option does what it says: clipping, dtype, config files, and the run folder's records on resume."""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import TINY_RUN
from mlx.utils import tree_flatten

from bdh_mlx.errors import CheckpointError
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.training import evaluate, options, train, trainer
from bdh_mlx.training.run_folder import RunFolder, link_or_copy


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def flat(model):
    return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.parameters())])


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_the_update(clip):
    """With plain SGD at lr 1 the update is the gradient itself: its norm must be the clip value when clipping."""
    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.0))
    before = flat(model)
    step, state = trainer.make_train_step(model, optim.SGD(learning_rate=1.0), max_grad_norm=clip)
    batch = mx.random.randint(0, 256, (1, 2, 17)).astype(mx.uint8)
    loss, norm = step(batch)
    mx.eval(state, loss, norm)
    moved = np.linalg.norm(flat(model) - before)
    assert norm.item() > 1e-2  # the raw gradient is far above the clip value
    assert moved == pytest.approx(clip if clip else norm.item(), rel=1e-3)


def test_grad_clip_flag_reaches_the_step(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(train, "make_optimizer", lambda *args: optim.SGD(learning_rate=1.0))
    runs = {}
    for clip in (None, "0.01"):
        out = tmp_path / f"run-{clip}"
        flags = [] if clip is None else ["--grad-clip", clip]
        assert train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "1", *flags]) == 0
        runs[clip] = read_checkpoint(out / "last.npz")[1]
    mx.random.seed(0)
    start = BDH(BDHConfig.from_preset("tiny"))
    initial = {k: np.array(v) for k, v in tree_flatten(start.parameters())}
    moved = {c: np.sqrt(sum(np.sum((w[k] - initial[k]) ** 2) for k in initial)) for c, w in runs.items()}
    assert moved["0.01"] == pytest.approx(0.01, rel=1e-3) and moved[None] > 0.05


def test_dtype_flag_changes_the_computation(tmp_path, corpus_file):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "1", "--dtype", dtype])
        losses[dtype] = records(out)[0]["train_loss"]
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)

    val = {}
    for dtype in ("float32", "bfloat16"):
        argv = ["--checkpoint", str(tmp_path / "float32" / "last.npz"), "--data", str(corpus_file),
                "--block-size", "32", "--batch-size", "4", "--eval-batches", "2", "--dtype", dtype]
        val[dtype] = evaluate.run(evaluate.build_parser().parse_args(argv))["val_loss"]
    assert val["bfloat16"] != val["float32"]
    assert val["bfloat16"] == pytest.approx(val["float32"], rel=0.02)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "steps: 3\nlr: 0.002\nschedule: linear\nsave-every: 0\n"),
    (".toml", 'steps = 3\nlr = 0.002\nschedule = "linear"\nsave-every = 0\n'),
])
def test_config_files_set_options(tmp_path, corpus_file, suffix, text):
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    out = tmp_path / "run"
    assert train.main([*TINY_RUN, "--config", str(config), "--data", str(corpus_file), "--out", str(out)]) == 0
    saved = json.loads((out / "last.json").read_text())["args"]
    assert (saved["steps"], saved["lr"], saved["schedule"], saved["save_every"]) == (3, 0.002, "linear", 0)
    assert json.loads((out / "last.json").read_text())["step"] == 3


def test_resume_drops_metrics_logged_after_the_resume_point(tmp_path, corpus_file):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "4", "--log-every", "2",
                "--save-every", "4", "--eval-every", "0"])
    with open(out / "metrics.jsonl", "a") as f:  # a run that logged steps 5-6, then died before saving them
        f.write(json.dumps({"step": 6, "train_loss": 9.0}) + "\n" + '{"step": 7, "train_lo')  # and a torn line
    assert train.main(["--resume", str(out), "--steps", "8"]) == 0
    assert [r["step"] for r in records(out)] == [1, 2, 4, 6, 8]
    assert records(out)[3]["train_loss"] != 9.0


def test_resume_keeps_a_best_model_newer_than_the_resume_point(tmp_path, corpus_file):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "4", "--eval-every", "2",
                "--save-every", "4"])
    # best.json is written at evaluations, last.json at saves: a crash between them leaves best.json newer.
    (out / "best.json").write_text(json.dumps({"val_loss": 1e-6, "step": 4}))
    best = (out / "best.npz").read_bytes()
    assert train.main(["--resume", str(out), "--steps", "8"]) == 0
    assert json.loads((out / "best.json").read_text()) == {"val_loss": 1e-6, "step": 4}
    assert (out / "best.npz").read_bytes() == best  # not replaced by a worse model


def test_resume_accepts_every_option_that_does_not_change_the_computation(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "2"])
    argv = ["--resume", str(out), "--steps", "4", "--no-progress", "--log-every", "1", "--eval-every", "0",
            "--save-every", "0", "--sample-tokens", "0", "--sample-prompt", "x"]
    assert train.main(argv) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--steps", "6", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    allowed = ", ".join("--" + n.replace("_", "-") for n in sorted(options.RESUMABLE))
    assert f"--lr cannot change when resuming (allowed: {allowed})" in err


def test_link_or_copy_falls_back_to_a_copy(tmp_path, monkeypatch):
    src, dst = tmp_path / "a.npz", tmp_path / "last.npz"
    src.write_bytes(b"weights")
    dst.write_bytes(b"old")

    def no_links(*args):
        raise OSError("links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"weights" and not os.path.samefile(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "last.npz"]


def test_metrics_reader_skips_only_a_torn_last_line(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert run.read_metrics() == [{"step": 1}, {"step": 2}]
    run.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match="line 2 is not JSON"):
        run.read_metrics()


def test_the_example_run_config_is_valid():
    path = Path(__file__).parent.parent / "examples" / "run.toml"
    values = options.read_config_file(train.build_parser, path)
    assert values["preset"] == "small" and values["steps"] == 500 and values["lr"] == 3e-3
