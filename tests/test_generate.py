"""Generation: cached decoding equals recomputation, UTF-8 streaming, stop strings, seeds, batches, the CLI."""

import errno
import io
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FP32_TOL, assert_close

from bdh_mlx import BDHError
from bdh_mlx.inference.generate import (
    _split_at_stop,
    batch_generate,
    generate,
    generate_step,
    main,
    prefill,
    stream_generate,
)
from bdh_mlx.inference.sample_utils import make_logits_processors, make_sampler
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.cache import BDHCache
from bdh_mlx.storage import checkpoint

TOL = FP32_TOL


@pytest.fixture(scope="module")
def model():
    mx.random.seed(11)
    return BDH(BDHConfig.from_preset("tiny", chunk_size=16))  # dropout 0.1: generation must switch it off


def scripted(data: bytes):
    """A sampler that ignores the model and emits ``data`` byte by byte."""
    it = iter(data)
    return lambda logprobs, key=None: mx.array([next(it)])


def stream_texts(model, data: bytes, **kwargs):
    return [(r.text, r.finish_reason) for r in stream_generate(model, "x", sampler=scripted(data), **kwargs)]


@pytest.mark.slow
def test_cached_greedy_equals_recompute(model):
    prompt = list(b"The dragon hatchling ")
    steps = list(generate_step(model, prompt, max_tokens=210, prefill_chunk=8))
    assert model.training, "generation must restore the training mode"
    model.eval()
    try:
        seq = list(prompt)
        for n, (token, logprobs) in enumerate(steps):
            logits, _ = model(mx.array([seq]))
            want = logits[0, -1] - mx.logsumexp(logits[0, -1])
            diff = float(mx.abs(logprobs - want).max())
            assert diff < TOL, f"step {n}: logprobs differ by {diff:.3g}"
            assert token == mx.argmax(want).item(), f"step {n}: token {token} != {mx.argmax(want).item()}"
            seq.append(token)
    finally:
        model.train()


def test_chunked_prefill_equals_token_by_token(model):
    model.eval()
    idx = mx.random.randint(0, 256, (1, 45), key=mx.random.key(12))
    chunked = model.make_cache(1)
    got = prefill(model, idx, chunked, chunk_size=13)
    stepped = model.make_cache(1)
    for t in range(idx.shape[1]):
        want, _ = model(idx[:, t : t + 1], cache=stepped)
    model.train()
    assert_close(got, want[:, -1], "last logits of the chunked prefill")
    assert chunked.offset.tolist() == stepped.offset.tolist() == [45]
    for a, b in zip(chunked.states, stepped.states, strict=True):
        assert_close(a, b, "cache state")


def test_utf8_split_across_tokens_and_invalid_bytes(model):
    data = "aé世🐉".encode() + b"\xffz"
    got = stream_texts(model, data, max_tokens=len(data))
    want_texts = ["a", "", "é", "", "", "世", "", "", "", "🐉", "\ufffd", "z"]
    assert [t for t, _ in got] == want_texts
    assert [f for _, f in got] == [None] * (len(data) - 1) + ["length"]


def test_incomplete_character_at_the_end_becomes_replacement(model):
    got = stream_texts(model, b"ok\xe4\xb8", max_tokens=4)
    assert "".join(t for t, _ in got) == "ok\ufffd"


def test_stop_string_split_across_tokens(model):
    data = "hello wörld, more".encode()
    got = stream_texts(model, data, max_tokens=len(data), stop=["xyz", "o w"])
    assert "".join(t for t, _ in got) == "hell"
    assert got[-1][1] == "stop" and len(got) == len(b"hello w")
    multibyte = stream_texts(model, data, max_tokens=len(data), stop=["örl"])
    assert "".join(t for t, _ in multibyte) == "hello w"


def test_held_back_text_is_released(model):
    data = b"abcabd"
    got = stream_texts(model, data, max_tokens=len(data), stop=["abx"])
    assert [t for t, _ in got] == ["", "", "abc", "", "", "abd"]
    assert got[-1][1] == "length"


def test_split_at_stop():
    assert _split_at_stop("one two", ["two", "ne"], final=False) == ("o", "", True)
    assert _split_at_stop("one tw", ["two"], final=False) == ("one ", "tw", False)
    assert _split_at_stop("one tw", ["two"], final=True) == ("one tw", "", False)


def test_same_seed_same_text_and_global_rng_untouched(model):
    sampler = make_sampler(1.0)
    mx.random.seed(123)
    untouched = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(123)
    first = generate(model, "seed", max_tokens=60, sampler=sampler, seed=7)
    assert mx.random.uniform(shape=(4,)).tolist() == untouched
    assert generate(model, "seed", max_tokens=60, sampler=sampler, seed=7) == first
    assert generate(model, "seed", max_tokens=60, sampler=sampler, seed=8) != first


def test_batch_of_prompts_of_different_lengths(model):
    prompts = ["a", "a much longer prompt than the others", "mid length"]
    got = batch_generate(model, prompts, max_tokens=30, prefill_chunk=7)
    assert got == [generate(model, p, max_tokens=30) for p in prompts]


def test_batch_with_repetition_penalty(model):
    prompts = ["ab", "a longer one"]
    processors = make_logits_processors(1.5, repetition_context_size=8)
    got = batch_generate(model, prompts, max_tokens=20, logits_processors=processors)
    assert got == [generate(model, p, max_tokens=20, logits_processors=processors) for p in prompts]


def test_prompt_forms_and_empty_prompt(model):
    want = generate(model, "héllo", max_tokens=10)
    assert generate(model, "héllo".encode(), max_tokens=10) == want
    assert generate(model, list("héllo".encode()), max_tokens=10) == want
    with pytest.raises(BDHError, match="the prompt is empty"):
        generate(model, "", max_tokens=10)


# --- bdh-mlx generate ------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.npz"
    checkpoint.save(model, path)
    return path


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code or 0, out, err


def test_cli_writes_prompt_and_continuation(model, ckpt, capsys):
    argv = ["--checkpoint", str(ckpt), "--prompt", "Once", "--max-tokens", "12", "--temperature", "0"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0
    assert out == "Once" + generate(model, "Once", max_tokens=12) + "\n"
    assert "Generation: 12 tokens" in err


def test_cli_reads_stdin_and_stops(model, ckpt, capsys, monkeypatch):
    full = generate(model, "stdin prompt", max_tokens=12)
    stop = full[3:5]
    argv = ["--checkpoint", str(ckpt), "--prompt", "-", "--max-tokens", "12", "--temperature", "0", "--stop", stop]
    code, out, _ = run_cli(argv, capsys, stdin=b"stdin prompt", monkeypatch=monkeypatch)
    assert code == 0 and out == "stdin prompt" + full[: full.index(stop)] + "\n"


def test_cli_sampling_is_reproducible(ckpt, capsys):
    argv = ["--checkpoint", str(ckpt), "--prompt", "hi", "--max-tokens", "30", "--seed", "5", "--top-p", "0.9"]
    assert run_cli(argv, capsys)[1] == run_cli(argv, capsys)[1]


def test_cli_prompt_cache(model, ckpt, capsys, tmp_path):
    saved = tmp_path / "cache.npz"
    base = ["--checkpoint", str(ckpt), "--max-tokens", "10", "--temperature", "0"]
    assert run_cli([*base, "--prompt", "first part, ", "--save-cache", str(saved)], capsys)[0] == 0
    code, out, _ = run_cli([*base, "--prompt", "second", "--load-cache", str(saved)], capsys)
    assert code == 0 and out == "second" + generate(model, "first part, second", max_tokens=10) + "\n"


def test_cli_refuses_a_cache_of_several_rows_at_load(model, ckpt, capsys, tmp_path):
    saved = tmp_path / "three.npz"
    cache = model.make_cache(3)
    prefill(model, mx.array([list(b"abc")] * 3), cache)
    cache.save(saved)
    assert BDHCache.load(saved, model.config).batch_size == 3  # the library takes it (batch_generate)
    code, out, err = run_cli(["--checkpoint", str(ckpt), "--prompt", "x", "--load-cache", str(saved)], capsys)
    assert (code, out) == (2, "")
    assert err == f"bdh-mlx generate: error: {saved}: the cache holds 3 rows (texts), not the 1 continued here\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--checkpoint", "MISSING"], "no such checkpoint file"),
        (["--prompt", "x", "--checkpoint", "CORRUPT"], "not a readable .npz checkpoint"),
        (["--prompt", "", "--checkpoint", "CKPT"], "the prompt is empty"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--top-k", "-1"], "--top-k"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--min-p", "1.5"], "--min-p"),
        (["--prompt", "x", "--checkpoint", "CKPT", "--load-cache", "MISSING"], "no such cache file"),
        (["--prompt", "x"], "--checkpoint"),
    ],
)
def test_cli_bad_input(args, message, ckpt, capsys, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a checkpoint")
    paths = {"MISSING": str(tmp_path / "missing.npz"), "CORRUPT": str(corrupt), "CKPT": str(ckpt)}
    code, out, err = run_cli([paths.get(a, a) for a in args], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("bdh-mlx generate: error:") and message in err, err


def test_cli_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bdh_mlx", "generate", "--checkpoint", str(tmp_path / "none.npz"), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "no such checkpoint file" in result.stderr


def test_lone_surrogate_prompt_is_a_bdh_error(model):
    with pytest.raises(BDHError, match=r"^the prompt holds '\\ud800' at position 2, which UTF-8 cannot encode"):
        generate(model, "ab\ud800", max_tokens=3)


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_cli_refuses_seeds_mlx_cannot_take(seed, ckpt, capsys):
    code, out, err = run_cli(["--checkpoint", str(ckpt), "--prompt", "x", "--seed", seed], capsys)
    assert (code, out) == (2, "")
    assert err == f"bdh-mlx generate: error: argument --seed: must be an integer in [0, {2**62}], got {seed}\n"


def save_cache_error(ckpt, capsys, target):
    argv = ["--checkpoint", str(ckpt), "--prompt", "x", "--max-tokens", "2", "--save-cache", str(target)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_cli_save_cache_to_a_directory_or_under_a_file(ckpt, capsys, tmp_path):
    folder = tmp_path / "folder"
    (folder / "keep").mkdir(parents=True)
    err = save_cache_error(ckpt, capsys, folder)
    assert err == f"bdh-mlx generate: error: {folder}: is a directory; a file name is needed\n"
    assert [p.name for p in folder.iterdir()] == ["keep"]
    (tmp_path / "file").write_text("kept")
    err = save_cache_error(ckpt, capsys, tmp_path / "file" / "cache.npz")
    assert err == f"bdh-mlx generate: error: {tmp_path / 'file'}: Not a directory\n"
    assert (tmp_path / "file").read_text() == "kept"


def test_cli_save_cache_on_a_full_disk(ckpt, capsys, tmp_path, monkeypatch):
    target = tmp_path / "cache.npz"
    target.write_bytes(b"the previous cache")

    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 part of a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    err = save_cache_error(ckpt, capsys, target)
    assert err == f"bdh-mlx generate: error: {target}: No space left on device\n"
    assert target.read_bytes() == b"the previous cache"  # the old file is untouched, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_mlx_lm_spellings(model, ckpt, capsys):
    """--model, -p, -m and --temp are the mlx-lm names of --checkpoint, --prompt, --max-tokens, --temperature."""
    long = run_cli(["--checkpoint", str(ckpt), "--prompt", "On", "--max-tokens", "9", "--temperature", "0.7",
                    "--seed", "3"], capsys)
    short = run_cli(["--model", str(ckpt), "-p", "On", "-m", "9", "--temp", "0.7", "--seed", "3"], capsys)
    assert short[:2] == long[:2] and long[0] == 0
    assert short[1] == "On" + generate(model, "On", max_tokens=9, temperature=0.7, seed=3) + "\n"


def test_sampling_keywords_equal_a_sampler(model):
    from bdh_mlx import generate as top_level_generate

    assert top_level_generate is generate  # the function, not the module
    by_keywords = generate(model, "On", max_tokens=20, temperature=0.9, top_k=5, top_p=0.9, min_p=0.05, seed=1)
    sampler = make_sampler(temperature=0.9, top_p=0.9, min_p=0.05, top_k=5)
    assert by_keywords == generate(model, "On", max_tokens=20, sampler=sampler, seed=1)
    assert by_keywords != generate(model, "On", max_tokens=20, temperature=0.9, seed=1)
    with pytest.raises(BDHError, match="give either sampler or temperature, not both"):
        generate(model, "On", sampler=sampler, temperature=0.5)
