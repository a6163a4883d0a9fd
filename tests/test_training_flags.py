"""Every flag of ``train`` and ``finetune`` that maps to a library keyword reaches it, spelled ``--flag value`` or
``--flag=value``; a quantized ``--init-from`` is refused before anything is written; the resume check sees both
spellings. The library's ``train`` is replaced by a recorder: these tests check what the commands pass to it."""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import datasets
import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx import quantize
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage import checkpoint
from bdh_mlx.training import finetune, train, trainer
from bdh_mlx.training.trainer import make_optimizer, make_schedule

SHAPE = ["--block-size", "16", "--batch-size", "4", "--eval-batches", "2", "--sample-tokens", "0", "--steps", "10"]
SPELLINGS = ["space", "equals"]


def spelled(flag, value, spelling):
    return [flag] if value is None else [flag, value] if spelling == "space" else [f"{flag}={value}"]


def lr_after(optimizer, steps=(1, 3, 6)):
    """The learning rate the optimizer applies at each of ``steps`` (its schedule, read through updates)."""
    params, rates = {"w": mx.zeros(1)}, []
    optimizer.init(params)
    for step in range(1, max(steps) + 1):
        params = optimizer.apply_gradients({"w": mx.zeros(1)}, params)
        if step in steps:
            rates.append(round(optimizer.learning_rate.item(), 9))
    return rates


def expected_lr(lr=1e-3, **schedule):
    return lr_after(make_optimizer(make_schedule(lr, **{"steps": 10, **schedule})))


def first_bytes(array, n=8) -> bytes:
    return np.asarray(array).reshape(-1)[:n].tobytes()


@pytest.fixture
def calls(monkeypatch):
    """The calls the commands make to ``trainer.train``, recorded instead of training."""
    made = []

    def record(model, optimizer, train_set, val_set, args, loss=None, inputs=None, **kw):
        made.append(SimpleNamespace(model=model, optimizer=optimizer, train_set=train_set, val_set=val_set,
                                    args=args, loss=loss, inputs=inputs, **kw))
        return {}

    monkeypatch.setattr(trainer, "train", record)
    return made


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Corpora, a saved dataset, instruction data and checkpoints, made once."""
    root = tmp_path_factory.mktemp("flags")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (root / "other.txt").write_text("D" * 2000)
    (root / "val.txt").write_text("V" * 500)
    split = lambda t: {"text": [t * 300] * 2, "body": ["b" * 300] * 2}  # noqa: E731
    datasets.DatasetDict({s: datasets.Dataset.from_dict(split(t)) for s, t in
                          (("train", "t"), ("other", "o"), ("validation", "v"))}).save_to_disk(str(root / "ds"))
    pairs = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(10)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "more.jsonl").write_text("".join(json.dumps({"instruction": f"M{i}", "output": "x"}) + "\n"
                                             for i in range(20)))
    (root / "val.jsonl").write_text(json.dumps({"instruction": "VALQ", "output": "VALA"}) + "\n")
    for name, seed in (("base", 1), ("other", 2)):
        mx.random.seed(seed)
        checkpoint.save(BDH(BDHConfig.from_preset("tiny")), root / f"{name}.npz")
    model = checkpoint.load(root / "base.npz")
    quantize(model, 8, 32, False)
    checkpoint.save(model, root / "q8.npz")
    return root


def weights_of(path):
    return first_bytes(checkpoint.read_checkpoint(path)[1]["encoder"])


# (extra flags, flag, value, what the library receives, the value it must have); {f} is the files folder.
COMMON_CASES = [
    ([], "--steps", "7", lambda c: c.args.steps, 7),
    ([], "--lr", "0.002", lambda c: lr_after(c.optimizer), expected_lr(0.002)),
    ([], "--weight-decay", "0.3", lambda c: round(c.optimizer.weight_decay, 6), 0.3),
    (["--lr", "1e-3"], "--schedule", "linear", lambda c: lr_after(c.optimizer), expected_lr(schedule="linear")),
    (["--lr", "1e-3"], "--warmup-steps", "4", lambda c: lr_after(c.optimizer), expected_lr(warmup_steps=4)),
    (["--lr", "1e-3", "--schedule", "cosine"], "--decay-steps", "6", lambda c: lr_after(c.optimizer),
     expected_lr(schedule="cosine", decay_steps=6)),
    (["--lr", "1e-3", "--schedule", "linear"], "--min-lr", "0.0005", lambda c: lr_after(c.optimizer),
     expected_lr(schedule="linear", min_lr=5e-4)),
    ([], "--grad-clip", "0.5", lambda c: c.args.grad_clip, 0.5),
    ([], "--grad-accum", "3", lambda c: c.args.grad_accum, 3),
    ([], "--seed", "5", lambda c: (c.args.seed, c.train_set.state["state"]),
     (5, np.random.PCG64(5).state["state"])),
    ([], "--eval-every", "7", lambda c: c.args.eval_every, 7),
    ([], "--save-every", "7", lambda c: c.args.save_every, 7),
    ([], "--log-every", "7", lambda c: c.args.log_every, 7),
    ([], "--sample-tokens", "7", lambda c: c.args.sample_tokens, 7),
    ([], "--sample-prompt", "Hi", lambda c: c.args.sample_prompt, "Hi"),
    ([], "--out", "elsewhere", lambda c: c.args.out, "elsewhere"),
    ([], "--run-name", "named", lambda c: c.args.out, str(Path("checkpoints_mlx") / "named")),
    ([], "--wandb", "proj", lambda c: c.args.wandb, "proj"),
    ([], "--no-progress", None, lambda c: c.args.progress, False),
    ([], "--dtype", "bfloat16", lambda c: c.model.compute_dtype, mx.bfloat16),
    ([], "--block-size", "24", lambda c: (c.train_set.block_size, c.val_set.shape[-1]), (24, 25)),
    ([], "--batch-size", "2", lambda c: (c.train_set.batch_size, c.val_set.shape[1]), (2, 2)),
    ([], "--dropout", "0.3", lambda c: c.model.config.dropout, 0.3),
    ([], "--attention", "chunked", lambda c: c.model.config.attention, "chunked"),
    ([], "--chunk-size", "8", lambda c: c.model.config.chunk_size, 8),
]
TRAIN_CASES = COMMON_CASES + [
    ([], "--eval-batches", "3", lambda c: len(c.val_set), 3),
    ([], "--preset", "small", lambda c: c.model.config, BDHConfig.from_preset("small")),
    ([], "--n-layer", "3", lambda c: c.model.config.n_layer, 3),
    ([], "--n-embd", "48", lambda c: c.model.config.n_embd, 48),
    ([], "--n-head", "4", lambda c: c.model.config.n_head, 4),
    ([], "--mlp-multiplier", "4", lambda c: c.model.config.mlp_internal_dim_multiplier, 4),
    ([], "--init-from", "{f}/other.npz", lambda c: first_bytes(c.model.encoder), "other.npz"),
    ([], "--model", "{f}/other.npz", lambda c: first_bytes(c.model.encoder), "other.npz"),  # mlx-lm's name
    ([], "--data", "{f}/other.txt", lambda c: first_bytes(c.train_set.data), b"D" * 8),
    ([], "--val-data", "{f}/val.txt", lambda c: first_bytes(c.val_set), b"V" * 8),
    (["--text-field", "text"], "--dataset", "{f}/ds", lambda c: first_bytes(c.train_set.data), b"t" * 8),
    (["--dataset", "{f}/ds"], "--text-field", "body", lambda c: first_bytes(c.train_set.data), b"b" * 8),
    (["--dataset", "{f}/ds", "--text-field", "text"], "--split", "other", lambda c: first_bytes(c.train_set.data),
     b"o" * 8),
    (["--dataset", "{f}/ds", "--text-field", "text"], "--val-split", "validation", lambda c: first_bytes(c.val_set),
     b"v" * 8),
    (["--dataset", "{f}/ds", "--text-field", "text"], "--cache-dir", "cache",
     lambda c: len(list(Path("cache").glob("dataset-*.bin"))), 1),
]
FINETUNE_CASES = COMMON_CASES + [
    (["--val-fraction", "0.9"], "--eval-batches", "3", lambda c: len(c.val_set), 3),
    ([], "--init-from", "{f}/other.npz", lambda c: first_bytes(c.model.encoder), "other.npz"),
    ([], "--model", "{f}/other.npz", lambda c: first_bytes(c.model.encoder), "other.npz"),
    ([], "--data", "{f}/more.jsonl", lambda c: c.source.split(" for validation")[0], "18 alpaca examples from "
     "{f}/more.jsonl in 18 blocks, 2"),
    ([], "--val-data", "{f}/val.jsonl", lambda c: b"VALA" in np.asarray(c.val_set).tobytes(), True),
    ([], "--val-fraction", "0.5", lambda c: c.source.split(", ")[-1], "5 for validation"),
    ([], "--max-examples", "4", lambda c: c.source.split(" alpaca")[0], "3"),
    (["--data", "org/pairs"], "--split", "other", lambda c: b"other" in np.asarray(c.train_set.data).tobytes(), True),
    (["--data", "org/pairs"], "--val-split", "validation", lambda c: b"validation" in np.asarray(c.val_set).tobytes(),
     True),
]


def command_call(command, argv, files, calls):
    """What ``command`` passes to the library for ``argv`` (None: the command refused)."""
    argv = [a.replace("{f}", str(files)) for a in argv]
    if command == "train":
        given = {a.split("=")[0] for a in argv}
        preset = [] if {"--preset", "--init-from", "--model"} & given else ["--preset", "tiny"]
        data = [] if "--dataset" in given else ["--data", str(files / "corpus.txt")]
        code = train.main([*preset, *data, *SHAPE, *argv])
    else:
        code = finetune.main(["--init-from", str(files / "base.npz"), "--data", str(files / "pairs.jsonl"), *SHAPE,
                              *argv])
    return calls.pop() if code == 0 else None


@pytest.mark.parametrize("command, extra, flag, value, got, want", [
    *(("train", *case) for case in TRAIN_CASES), *(("finetune", *case) for case in FINETUNE_CASES)],
    ids=[f"{c}{case[1]}" for c, cases in (("train", TRAIN_CASES), ("finetune", FINETUNE_CASES)) for case in cases])
def test_every_flag_reaches_the_library(command, extra, flag, value, got, want, files, calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    # a Hub dataset "org/pairs" whose responses name their split
    monkeypatch.setattr(finetune, "open_dataset", lambda spec, split: datasets.Dataset.from_dict(
        {"instruction": ["q"] * 8, "output": [split] * 8}))
    if isinstance(want, str) and want.endswith(".npz"):
        want = weights_of(files / want)
    elif isinstance(want, str):
        want = want.replace("{f}", str(files))
    without = command_call(command, extra, files, calls)
    assert without is None or got(without) != want  # the flag matters: ignoring it would fail
    for spelling in SPELLINGS if value is not None else ["switch"]:
        call = command_call(command, [*extra, *spelled(flag, value, spelling)], files, calls)
        assert call is not None and got(call) == want, spelling


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_quantized_init_from_is_refused_before_anything_is_written(command, files, tmp_path, capsys):
    out = tmp_path / "run"
    main = train.main if command == "train" else finetune.main
    extra = ["--data", str(files / ("corpus.txt" if command == "train" else "pairs.jsonl"))]
    assert main(["--init-from", str(files / "q8.npz"), *extra, *SHAPE, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"bdh-mlx {command}: error: {files / 'q8.npz'} holds a quantized model (8-bit weights, for generating "
        f"only); train or fine-tune the float checkpoint it was quantized from\n")
    assert not out.exists()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_resume_check_sees_both_spellings(spelling, files, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--data", str(files / "corpus.txt"), *SHAPE, "--steps", "2",
                       "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(out), *spelled("--steps", "4", spelling), *spelled("--lr", "1", spelling)]) == 2
    assert "bdh-mlx train: error: --lr cannot change when resuming" in capsys.readouterr().err
    assert json.loads((out / "last.json").read_text())["step"] == 2
    assert train.main(["--resume", str(out), *spelled("--steps", "4", spelling), "--no-progress"]) == 0
    assert json.loads((out / "last.json").read_text())["step"] == 4  # --steps, in either spelling, is the total


@pytest.mark.parametrize("text, message", [
    ('lr = "fast"\n', "argument --lr: must be a positive number, got 'fast'"),
    ('schedule = "cubic"\n', "argument --schedule: invalid choice: 'cubic'"),
    ("no-progress = 3\n", "no-progress: must be true or false, got 3"),
])
def test_config_file_values_are_checked_like_flags(text, message, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(text)
    assert train.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"bdh-mlx train: error: {config}: {message}")
    assert not (tmp_path / "run").exists()


def test_config_file_switches_and_values_reach_the_library(files, calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text('no-progress = true\nlr = 0.002\nsample-prompt = "Hi"\n')
    call = command_call("train", ["--config", str(config)], files, calls)
    assert (call.args.progress, call.args.sample_prompt, lr_after(call.optimizer)) == (False, "Hi", expected_lr(0.002))
