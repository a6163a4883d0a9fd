"""Hostile fine-tuning data: each case is one line naming the file (and the line), exit 2, and no run folder."""

import json

import mlx.core as mx
import pytest

from bdh_mlx import BDH, BDHConfig
from bdh_mlx.storage import checkpoint
from bdh_mlx.training.finetune import main as finetune_main

FT = ["--block-size", "32", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress",
      "--steps", "1"]
GOOD = json.dumps({"instruction": "a", "output": "b"}) + "\n"
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny.npz"
    mx.random.seed(0)
    checkpoint.save(BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)), path)
    return path


def fails_with(base, tmp_path, capsys, data, message, *more):
    out = tmp_path / "run"
    code = finetune_main([*FT, "--init-from", str(base), "--data", str(data), *more, "--out", str(out)])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"bdh-mlx finetune: error: {message}\n")
    assert not out.exists()


def test_invalid_utf8_names_the_line_and_the_byte(base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    content = (GOOD * 2 + '{"instruction": "caf').encode() + b"\xe9" + b'", "output": "x"}\n'
    data.write_bytes(content)
    offset = content.index(b"\xe9")
    fails_with(base, tmp_path, capsys, data, f"{data}: line 3 is not valid UTF-8 (byte 0xe9 at offset {offset})")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deep_nesting_is_refused(base, tmp_path, capsys, suffix):
    data = tmp_path / f"deep{suffix}"
    data.write_text(GOOD + DEEP + "\n" if suffix == ".jsonl" else DEEP)
    where = f"{data}: line 2" if suffix == ".jsonl" else str(data)
    fails_with(base, tmp_path, capsys, data, f"{where}: JSON nested too deeply")


def test_a_100000_digit_number_is_refused(base, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(GOOD + '{"instruction": 1' + "0" * 100_000 + ', "output": "x"}\n')
    out = tmp_path / "run"
    assert finetune_main([*FT, "--init-from", str(base), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bdh-mlx finetune: error: {data}: line 2: not valid JSON (Exceeds the limit (4300 digits)")
    assert err.count("\n") == 1 and len(err) < 400 and not out.exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_is_refused(base, tmp_path, capsys, suffix):
    record = '{"instruction": "a\\ud800b", "output": "x"}'
    data = tmp_path / f"surrogate{suffix}"
    data.write_text(GOOD + record + "\n" if suffix == ".jsonl" else f"[{GOOD}, {record}]")
    where = f"{data}: line 2" if suffix == ".jsonl" else str(data)
    fails_with(base, tmp_path, capsys, data, f"{where}: holds '\\ud800', a lone surrogate, which is not text")


def test_an_empty_validation_file_is_named(base, tmp_path, capsys):
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text(GOOD * 4)
    val.write_text("")
    fails_with(base, tmp_path, capsys, data, f"{val} (validation): no examples (the data is empty)",
               "--val-data", str(val))


def test_an_empty_valid_file_in_a_folder_is_named(base, tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_text(GOOD * 4)
    (folder / "valid.jsonl").write_text("\n")
    valid = folder / "valid.jsonl"
    fails_with(base, tmp_path, capsys, folder, f"{valid} (validation): no examples (the data is empty)")


def test_a_corrupt_parquet_file_is_one_line(base, tmp_path, capfd):
    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"PAR1" + bytes(range(256)) * 8)
    out = tmp_path / "run"
    assert finetune_main([*FT, "--init-from", str(base), "--data", str(data), "--out", str(out)]) == 2
    err = capfd.readouterr().err  # at the file descriptor: datasets logs through a handler of its own
    assert err.startswith(f"bdh-mlx finetune: error: {data}: cannot load the dataset (split 'train'): ")
    assert err.count("\n") == 1 and not out.exists()
