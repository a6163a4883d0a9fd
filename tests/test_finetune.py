import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx import BDH, BDHConfig, apply_template, end_of_response, generate
from bdh_mlx.inference.chat import main as chat_main
from bdh_mlx.inference.generate import main as generate_main
from bdh_mlx.inference.template import ALPACA_TEMPLATE
from bdh_mlx.storage import checkpoint
from bdh_mlx.training.finetune import Example, encode, load_examples, normalise, pack, parse_args, response_loss
from bdh_mlx.training.finetune import main as finetune_main

FT = ["--block-size", "64", "--batch-size", "4", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress",
      "--dropout", "0"]
PAIRS = [("Color of the sky?", "blue"), ("Opposite of hot?", "cold"), ("2 + 2?", "four"), ("Say hi.", "hello")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fresh tiny model (no template) saved as a checkpoint."""
    path = tmp_path_factory.mktemp("base") / "tiny.npz"
    mx.random.seed(3)
    checkpoint.save(BDH(BDHConfig.from_preset("tiny", dropout=0.0)), path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl",
                       [{"instruction": i, "input": "", "output": o} for i, o in PAIRS])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base, pairs_file):
    """The tiny model fine-tuned until it has learned PAIRS by heart."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    code = finetune_main([*FT, "--init-from", str(base), "--data", str(pairs_file), "--val-data", str(pairs_file),
                          "--out", str(out), "--steps", "120", "--lr", "1e-2", "--weight-decay", "0",
                          "--eval-every", "0", "--save-every", "0"])
    assert code == 0
    return out / "last.npz"


# --- Data ------------------------------------------------------------------------------------


def test_dolly_records_become_alpaca_like_the_official_code():
    records = [
        {"instruction": "Who wrote it?", "context": "It was written by Ann.", "response": "Ann", "category": "qa"},
        {"instruction": "Name a colour.", "context": "", "response": "Red", "category": "brainstorming"},
    ]
    examples, fmt = normalise(records, "dolly.jsonl")
    assert fmt == "dolly"
    assert examples == [Example("Who wrote it?\n\n**Context:**\nIt was written by Ann.", "", "Ann"),
                        Example("Name a colour.", "", "Red")]


def test_formats_are_detected_from_the_columns():
    alpaca = normalise([{"instruction": "I", "input": "X", "output": "O"}], "a")
    assert alpaca == ([Example("I", "X", "O")], "alpaca")
    completion = normalise([{"prompt": "P", "completion": "C"}], "c")
    assert completion == ([Example("P", "", "C")], "completion")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    chat = normalise([{"messages": messages}], "m")
    assert chat == ([Example("Hi", "System: Be brief.", "Hello"),
                     Example("Bye", "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello", "Goodbye")], "chat")


def test_max_examples_and_the_validation_share(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    args = parse_args(["--init-from", "x", "--data", str(data), "--max-examples", "20", "--val-fraction", "0.25"])
    loaded = load_examples(args)
    assert (len(loaded.train), len(loaded.val)) == (15, 5)
    assert sorted(e.instruction for e in loaded.train + loaded.val) == sorted(f"p{i}" for i in range(20))


# --- Tokens, masks, truncation, loss ------------------------------------------------------------


def test_encoding_masks_the_prompt_and_truncates_it_from_the_start(capsys):
    template = {"prompt": "Q:{instruction}\nA:", "prompt_input": "", "end": "$"}
    tokens, mask, cut = encode(Example("abc", "", "xy"), template, 16)
    assert bytes(tokens) == b"Q:abc\nA:xy$" and cut == 0
    assert mask.tolist() == [0] * 8 + [1] * 3
    tokens, mask, cut = encode(Example("abcdefgh", "", "xy"), template, 8)  # 16 bytes in 8: 8 prompt bytes go
    assert bytes(tokens) == b"gh\nA:xy$" and mask.tolist() == [0] * 5 + [1] * 3 and cut == 1
    rows = pack([Example("abc", "", "xy"), Example("abcdefgh", "", "xy"), Example("a", "", "z")], template, 15)
    assert capsys.readouterr().err == ""  # nothing was truncated
    assert rows.shape == (3, 2, 16)  # 11 bytes, then 16 (does not fit beside them), then 8 (nor beside those)
    assert bytes(rows[0, 0]) == b"Q:abc\nA:xy$" + bytes(5) and rows[0, 1].tolist() == [0] * 8 + [1] * 3 + [0] * 5
    assert bytes(rows[1, 0]) == b"Q:abcdefgh\nA:xy$"
    pack([Example("abcdefgh", "", "xy")] * 2 + [Example("a", "", "b")], template, 9)
    assert "2 of 3 examples are longer than --block-size + 1 = 10 bytes: their prompts were truncated from the " \
           "start" in capsys.readouterr().err


def test_loss_is_the_cross_entropy_of_the_response_bytes_only():
    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("tiny", dropout=0.0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(2, 9))
    mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1]])
    loss = response_loss(model, mx.array(np.stack([tokens, mask], axis=1).astype(np.uint8))).item()
    logits = np.array(model(mx.array(tokens[:, :-1]))[0], dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = [(b, t) for b in range(2) for t in range(8) if mask[b, t + 1]]  # 3 + 2 response positions
    expected = -np.mean([log_probs[b, t, tokens[b, t + 1]] for b, t in targets])
    assert loss == pytest.approx(expected, rel=1e-5)


# --- The template in the checkpoint ---------------------------------------------------------------


def test_template_round_trips_through_the_checkpoint_and_old_ones_have_none(tmp_path, base):
    assert checkpoint.load(base).config.prompt_template is None
    model = checkpoint.load(base)
    model.config.prompt_template = {**ALPACA_TEMPLATE, "end": "</s>"}
    checkpoint.save(model, tmp_path / "t.npz")
    loaded = checkpoint.load(tmp_path / "t.npz")
    assert loaded.config.prompt_template == {**ALPACA_TEMPLATE, "end": "</s>"}
    assert apply_template(loaded, "Do it.", "now") == "### Instruction:\nDo it.\n\n### Input:\nnow\n\n### Response:\n"
    assert end_of_response(loaded) == "</s>"


# --- Fine-tuning end to end ------------------------------------------------------------------------


def test_a_fine_tuned_model_answers_its_instructions(tuned):
    model = checkpoint.load(tuned)
    assert model.config.prompt_template == ALPACA_TEMPLATE
    for instruction, response in PAIRS:
        answer = generate(model, apply_template(model, instruction), max_tokens=20, stop=[end_of_response(model)])
        assert answer == response


def test_generate_instruction_and_chat_through_a_pipe(tuned, capsys):
    assert generate_main(["--checkpoint", str(tuned), "--instruction", "Say hi.", "--temp", "0"]) == 0
    assert capsys.readouterr().out == "hello\n"
    chat = subprocess.run([sys.executable, "-m", "bdh_mlx", "chat", "--checkpoint", str(tuned)],
                          input="Opposite of hot?\n\n2 + 2?\n", capture_output=True, text=True, timeout=120)
    assert (chat.returncode, chat.stdout) == (0, "cold\nfour\n")


def test_resuming_a_fine_tune_is_exact(tmp_path, base, pairs_file):
    common = [*FT, "--init-from", str(base), "--data", str(pairs_file), "--lr", "3e-3", "--eval-every", "0",
              "--save-every", "0", "--log-every", "1", "--dropout", "0.2", "--grad-accum", "2"]
    assert finetune_main([*common, "--out", str(tmp_path / "one"), "--steps", "8"]) == 0
    assert finetune_main([*common, "--out", str(tmp_path / "two"), "--steps", "4"]) == 0
    assert finetune_main(["--resume", str(tmp_path / "two"), "--steps", "8"]) == 0
    one, two = (checkpoint.read_checkpoint(tmp_path / r / "last.npz") for r in ("one", "two"))
    assert one[0] == two[0] and one[0].prompt_template == ALPACA_TEMPLATE
    assert all(np.array_equal(one[1][k], two[1][k]) for k in one[1])
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("one", "two")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


# --- Bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("records, message", [
    ([{"text": "a"}], "no usable columns (found: text); expected instruction/input/output (Alpaca)"),
    ([], "no examples (the data is empty)"),
    ([{"instruction": "a", "output": ""}] * 3, "none of the 3 examples has a response"),
])
def test_unusable_data_is_one_line_exit_2(tmp_path, base, capsys, records, message):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    code = finetune_main([*FT, "--init-from", str(base), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"bdh-mlx finetune: error: {data}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_no_template_or_no_model_is_one_line_exit_2(base, capsys):
    assert generate_main(["--checkpoint", str(base), "--instruction", "Hi"]) == 2
    no_template = "this checkpoint has no prompt template: it was not fine-tuned with bdh-mlx finetune"
    assert capsys.readouterr().err.startswith(f"bdh-mlx generate: error: {no_template}")
    assert chat_main(["--checkpoint", str(base)]) == 2
    assert capsys.readouterr().err.startswith(f"bdh-mlx chat: error: {no_template}")
    assert finetune_main(["--data", "x.jsonl"]) == 2
    assert capsys.readouterr().err == ("bdh-mlx finetune: error: --init-from CKPT_OR_REPO (the model to fine-tune) "
                                       "and --data FILE_OR_DATASET are required\n")


def test_a_folder_gives_its_train_and_valid_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(4)])
    (tmp_path / "valid.json").write_text(json.dumps([{"prompt": "v", "completion": "c"}]))
    loaded = load_examples(parse_args(["--init-from", "x", "--data", str(tmp_path)]))
    assert sorted(e.instruction for e in loaded.train) == ["p0", "p1", "p2", "p3"]
    assert loaded.val == [Example("v", "", "c")] and loaded.source == str(tmp_path)


def test_training_samples_of_an_instruction_tuned_model_end_at_its_marker():
    """The evaluation sample stops where the model writes its end-of-response marker, like chat."""
    from types import SimpleNamespace

    from bdh_mlx.training.trainer import sample_text

    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("tiny"))
    args = SimpleNamespace(sample_prompt="Hello", sample_tokens=60, seed=3)
    plain = sample_text(model, args)
    end = plain[20:22]  # a marker the model is known to write at byte 20 (same seed, same draws)
    model.config.prompt_template = {**ALPACA_TEMPLATE, "end": end}
    assert sample_text(model, args) == plain[: plain.index(end)]
