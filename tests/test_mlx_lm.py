"""A bdh-mlx model inside mlx-lm: the exported folder, mlx-lm's generate, prompt cache, batching and server."""

import ast
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from bdh_mlx import BDH, BDHConfig, generate, generate_step, load, make_logits_processors, quantize, save
from bdh_mlx.cli import COMMANDS
from bdh_mlx.errors import BDHError, CheckpointError
from bdh_mlx.inference.generate import main as generate_cli
from bdh_mlx.inference.generate import prefill
from bdh_mlx.inference.template import ALPACA_TEMPLATE, format_prompt, history_text
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.convert import export
from bdh_mlx.storage.mlx_lm import tokenizer_json
from bdh_mlx.tools.quantize import main as quantize_cli
from bdh_mlx.training.evaluate import main as eval_cli

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.generate import batch_generate  # noqa: E402
from mlx_lm.generate import generate_step as mlx_generate_step  # noqa: E402
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache  # noqa: E402

TINY = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)
PROMPT = " The dragon's é and 😀 "  # a leading space, multi-byte characters


def tiny_model(seed=0, **overrides) -> BDH:
    """A random tiny model with large weights, so that greedy decoding wanders through all kinds of bytes."""
    mx.random.seed(seed)
    model = BDH(BDHConfig(**{**TINY, **overrides}))
    model.update({k: v * 8 for k, v in model.parameters().items() if k != "embed"})
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny base model as .npz and as an mlx-lm folder; an instruction-tuned one as a folder."""
    root = tmp_path_factory.mktemp("mlx_lm")
    save(tiny_model(), root / "base.npz")
    export(root / "base.npz", root / "base")
    save(tiny_model(1, prompt_template=ALPACA_TEMPLATE), root / "chat.npz")
    export(root / "chat.npz", root / "chat")
    return root


@pytest.fixture(scope="module")
def loaded(folders):
    """mlx-lm's (model, tokenizer) of the base folder, and bdh-mlx's model of the same checkpoint."""
    model, tokenizer = mlx_lm.load(str(folders / "base"), trust_remote_code=True)
    return model, tokenizer, load(folders / "base.npz")


def bdh_steps(model, prompt, n):
    """bdh-mlx's greedy tokens and their log-probabilities for ``prompt`` alone."""
    steps = list(generate_step(model, prompt, max_tokens=n))
    return [t for t, _ in steps], [float(lp[t]) for t, lp in steps]


# --- The folder --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "quantized", "instruction"])
def test_export_reads_back_exactly(tmp_path, kind):
    model = tiny_model(prompt_template=ALPACA_TEMPLATE if kind == "instruction" else None)
    if kind == "quantized":
        model = quantize(model, bits=4, group_size=32)
    save(model, tmp_path / "m.npz")
    export(tmp_path / "m.npz", tmp_path / "dir")
    (config, weights), (got_config, got) = read_checkpoint(tmp_path / "m.npz"), read_checkpoint(tmp_path / "dir")
    assert got_config == config
    assert sorted(got) == sorted(weights)
    for name, array in weights.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    idx = mx.array([list(PROMPT.encode())])
    assert np.array_equal(np.array(load(tmp_path / "dir")(idx)[0]), np.array(load(tmp_path / "m.npz")(idx)[0]))


def test_model_file_is_a_few_lines_over_bdh_mlx(folders):
    source = (folders / "base" / "bdh_model.py").read_text()
    docstring, *code = ast.parse(source).body
    assert isinstance(docstring.value, ast.Constant)
    assert [ast.unparse(c) for c in code] == ["from bdh_mlx.inference.mlx_lm_model import Model, ModelArgs"]
    assert len(source.splitlines()) <= 5


def test_tokenizer_maps_bytes_to_their_values(loaded):
    _, tokenizer, _ = loaded
    assert tokenizer.encode(PROMPT) == list(PROMPT.encode("utf-8"))
    data = bytes(range(256))
    assert tokenizer.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_streaming_detokenizer_keeps_every_byte(loaded):
    """A leading space, and characters whose bytes come one token at a time, stream out unchanged."""
    _, tokenizer, _ = loaded
    detokenizer = tokenizer.detokenizer
    for text in (PROMPT, " a\n b ", "\n\n  x", "ü😀 \xff"):
        detokenizer.reset()
        pieces = []
        for token in text.encode("utf-8"):
            detokenizer.add_token(token)
            pieces.append(detokenizer.last_segment)
        detokenizer.finalize()
        pieces.append(detokenizer.last_segment)
        assert "".join(pieces) == text


def write_json(path, content):
    path.write_text(json.dumps(content))


def test_foreign_folders_are_refused_in_one_line(folders, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    write_json(llama / "config.json", {"model_type": "llama", "hidden_size": 8})
    with pytest.raises(CheckpointError, match=r"not a bdh-mlx model folder \(model_type 'llama'\)"):
        read_checkpoint(llama)
    wrong_tokens = tmp_path / "wrong_tokens"
    subprocess.run(["cp", "-r", str(folders / "base"), str(wrong_tokens)], check=True)
    tok = tokenizer_json()
    tok["model"]["vocab"] = {c: 255 - i for c, i in tok["model"]["vocab"].items()}
    write_json(wrong_tokens / "tokenizer.json", tok)
    with pytest.raises(CheckpointError, match="not a byte-level tokenizer whose token ids are the byte values"):
        read_checkpoint(wrong_tokens)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-4], r"lm_head ends at byte 163,840 of the data, which holds 163,836 \(a truncated file\)"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], r"header length 1,000,000,000 out of bounds"),
    (lambda b: b.replace(b'"F32"', b'"I64"', 1), "dtype 'I64' is not one of"),
])
def test_damaged_safetensors_are_refused(folders, tmp_path, damage, message):
    folder = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folders / "base"), str(folder)], check=True)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(folder)


def test_cli_takes_a_folder_and_refuses_foreign_ones_in_one_line(folders, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for folder, code in ((folders / "base", 0), (tmp_path, 2)):
        result = subprocess.run([sys.executable, "-m", "bdh_mlx", "generate", "--model", str(folder), "--prompt", "a",
                                 "-m", "3"], capture_output=True, text=True, env=os.environ)
        assert result.returncode == code, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a bdh-mlx model folder" in result.stderr


# --- Inside mlx-lm -----------------------------------------------------------------


def test_mlx_lm_generate_prints_what_bdh_mlx_prints(loaded):
    model, tokenizer, bdh = loaded
    want = generate(bdh, PROMPT, max_tokens=64)
    got = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=64)
    assert got == want
    assert any(ord(c) > 0x7F and c != "\ufffd" for c in want), "the continuation should hold a multi-byte character"


def test_prompt_cache_saves_and_continues(loaded, tmp_path):
    """A prompt cache through mlx-lm's save/load (the classes mlx-lm knows) continues as the whole text does."""
    model, tokenizer, bdh = loaded
    cache = make_prompt_cache(model)
    for _ in mlx_generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=0, prompt_cache=cache):
        pass  # as mlx_lm.cache_prompt does
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    cache = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    got = mlx_lm.generate(model, tokenizer, "more", max_tokens=20, prompt_cache=cache)
    assert got == generate(bdh, PROMPT + "more", max_tokens=20)


def test_batches_of_different_lengths_match_each_prompt_alone(loaded):
    """mlx-lm pads the shorter prompts; padding writes nothing, so each row is its prompt run alone."""
    model, tokenizer, bdh = loaded
    prompts = [list(p.encode()) for p in ("Hi", PROMPT, "a longer prompt, padded less than the others" * 3)]
    n = 24
    result = batch_generate(model, tokenizer, prompts, max_tokens=n, return_token_ids=True, return_logprobs=True)
    for prompt, tokens, logprobs in zip(prompts, result.token_ids, result.logprobs, strict=True):
        want_tokens, want_logprobs = bdh_steps(bdh, prompt, n)
        assert tokens == want_tokens
        assert_close(logprobs, want_logprobs, "log-probabilities")


def test_lora_is_refused_clearly(loaded):
    model, _, _ = loaded
    with pytest.raises(Exception, match="no per-layer linear layers for mlx-lm's LoRA"):
        len(model.layers)


# --- mlx_lm.server, through the openai client --------------------------------------------

SERVER_START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(folders):
    """``mlx_lm.server`` on a free loopback port with the base and instruction-tuned folders; always stopped."""
    import openai

    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folders / "base"), "--trust-remote-code",
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlx_lm.server did not start (exit code {process.poll()})")
                time.sleep(0.5)
        yield client
    finally:
        process.kill()
        process.wait(timeout=30)


def complete(client, prompt, n, model="default_model", **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0.0, **kwargs)


@pytest.mark.slow
def test_server_completions_streamed_and_not(server, folders):
    bdh = load(folders / "base.npz")
    want = generate(bdh, PROMPT, max_tokens=32)
    assert complete(server, PROMPT, 32).choices[0].text == want
    chunks = complete(server, PROMPT, 32, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


@pytest.mark.slow
def test_server_concurrent_requests_match_each_prompt_alone(server, folders):
    """Requests of different lengths at once (batched, padded by the server): each gets its own prompt's tokens
    and log-probabilities."""
    bdh = load(folders / "base.npz")
    prompts = ["Hi", PROMPT, "x" * 150, "Another prompt of its own length."]
    n = 16

    def ask(prompt):
        choice = complete(server, prompt, n, logprobs=True).choices[0]
        return [(entry["id"], entry["logprob"]) for entry in choice.logprobs.model_dump()["content"]]

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        tokens, logprobs = bdh_steps(bdh, prompt, n)
        assert [t for t, _ in answer] == tokens
        assert_close([lp for _, lp in answer], logprobs, "log-probabilities")


@pytest.mark.slow
def test_server_chat_uses_the_stored_template(server, folders):
    """An instruction-tuned model answers chat messages as bdh-mlx does with its template (and --history)."""
    bdh = load(folders / "chat.npz")
    end = ALPACA_TEMPLATE["end"]
    model = str(folders / "chat")
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    for messages in ([turns[0]], [*turns, {"role": "user", "content": "And another?"}]):
        prompt = format_prompt(ALPACA_TEMPLATE, messages[-1]["content"], history_text(messages[:-1]))
        want = generate(bdh, prompt, max_tokens=24, stop=[end])
        args = dict(model=model, messages=messages, max_tokens=24, temperature=0.0, stop=[end])
        assert server.chat.completions.create(**args).choices[0].message.content == want
        chunks = server.chat.completions.create(**args, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


# --- mlx-lm's habits in bdh-mlx's own API and CLI ------------------------------------------


def test_mlx_lm_keywords_are_accepted_or_refused_by_name(folders):
    bdh = load(folders / "base.npz")
    greedy = generate(bdh, PROMPT, max_tokens=12)
    assert generate(bdh, PROMPT, max_tokens=12, temp=0.0, prefill_step_size=3) == greedy
    cache = bdh.make_cache()
    generate(bdh, PROMPT, max_tokens=1, prompt_cache=cache)  # mlx-lm's name of ``cache``: advanced in place
    assert int(cache.offset[0]) == len(PROMPT.encode())
    penalised = generate(bdh, PROMPT, max_tokens=12, logits_processors=make_logits_processors(1.5, 4))
    assert generate(bdh, PROMPT, max_tokens=12, repetition_penalty=1.5, repetition_context_size=4) == penalised
    with pytest.raises(BDHError, match="^generate_step\\(\\) does not take max_kv_size: BDH's state has a fixed size"):
        generate(bdh, PROMPT, max_kv_size=64)
    with pytest.raises(BDHError, match="^generate_step\\(\\) got an unexpected keyword argument 'tempp'; it takes "):
        generate(bdh, PROMPT, tempp=0.5)
    with pytest.raises(BDHError, match="give either temperature or temp"):
        generate(bdh, PROMPT, temp=0.5, temperature=0.5)


def test_load_returns_a_byte_tokenizer_when_asked(folders, loaded):
    _, mlx_tokenizer, _ = loaded
    model, tokenizer = load(folders / "base", return_tokenizer=True)
    assert isinstance(model, BDH)
    assert tokenizer.encode(PROMPT) == mlx_tokenizer.encode(PROMPT)
    data = list(range(256)) * 2
    assert tokenizer.decode(data) == mlx_tokenizer.decode(data)
    with pytest.raises(BDHError, match=r"take \(model, prompt, ...\): no tokenizer"):
        generate(model, tokenizer, PROMPT)


def test_cli_samples_greedily_by_default(folders, capsys):
    bdh = load(folders / "base.npz")
    assert generate_cli(["--model", str(folders / "base"), "-p", PROMPT, "-m", "40"]) == 0
    assert capsys.readouterr().out == PROMPT + generate(bdh, PROMPT, max_tokens=40) + "\n"


def test_printed_prompt_speed_counts_the_prefill(folders, capsys, monkeypatch):
    """The prompt is read before generation starts (to save the state): its time is the prompt's speed."""
    slow = 0.5

    def slow_prefill(*args, **kwargs):
        time.sleep(slow)
        return prefill(*args, **kwargs)

    monkeypatch.setattr("bdh_mlx.inference.generate.prefill", slow_prefill)
    assert generate_cli(["--model", str(folders / "base"), "-p", PROMPT, "-m", "2"]) == 0
    speed = float(re.search(r"Prompt: \d+ tokens, ([\d.]+) tokens-per-sec", capsys.readouterr().err).group(1))
    assert speed <= len(PROMPT.encode()) / slow


@pytest.mark.parametrize("command, rest", [
    ("generate", ["-p", "x"]), ("chat", []), ("eval", []), ("inspect", ["--text", "x"]),
    ("neurons", ["--data", "d", "--out", "o"]), ("synapses", []), ("graphs", []),
    ("quantize", ["--bits", "4", "--out", "q.npz"]),
    ("upload", ["--repo", "org/name"]),
])
def test_model_is_the_checkpoint_everywhere(command, rest):
    module = importlib.import_module(COMMANDS[command][0])
    parse = getattr(module, "parse_args", None) or module.build_parser().parse_args
    assert parse(["--model", "some/folder", *rest]).checkpoint == "some/folder"


def test_quantize_and_eval_take_an_mlx_lm_folder(folders, tmp_path, corpus_file):
    assert quantize_cli(["--model", str(folders / "base"), "--bits", "8", "--group-size", "32",
                         "--out", str(tmp_path / "q.npz")]) == 0
    assert read_checkpoint(tmp_path / "q.npz")[0].quantization["bits"] == 8
    export(tmp_path / "q.npz", tmp_path / "q")
    assert eval_cli(["--model", str(tmp_path / "q"), "--data", str(corpus_file), "--block-size", "32",
                     "--batch-size", "2", "--eval-batches", "1"]) == 0


# --- The end of an answer --------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_loaded(folders):
    return mlx_lm.load(str(folders / "chat"), trust_remote_code=True)


def test_an_answer_ends_after_the_end_marker(chat_loaded):
    """mlx-lm stops at one end token: the adapter gives it (256) right after the model wrote the marker."""
    model, tokenizer = chat_loaded
    end = ALPACA_TEMPLATE["end"]
    assert tokenizer.eos_token_ids == {256}
    assert tokenizer.encode(f"a{end}") == list(f"a{end}".encode())  # text holding the marker is still bytes
    prompt = format_prompt(ALPACA_TEMPLATE, "Name a colour.")
    logits = model(mx.array([tokenizer.encode(prompt + "Blue." + end)]), cache=make_prompt_cache(model))
    assert logits.shape[-1] == 257 and int(mx.argmax(logits[0, -1])) == 256
    assert float(logits[0, -2, 256]) == -np.inf  # only after the marker
    assert mlx_lm.generate(model, tokenizer, prompt + "Blue." + end, max_tokens=8) == ""
    batch = batch_generate(model, tokenizer, [tokenizer.encode(prompt + "Blue." + end), tokenizer.encode(prompt)],
                           max_tokens=8, return_token_ids=True)
    assert batch.token_ids[0] == [] and len(batch.token_ids[1]) == 8


def test_the_end_token_fed_back_writes_nothing(chat_loaded):
    model, tokenizer = chat_loaded
    cache = make_prompt_cache(model)
    model(mx.array([tokenizer.encode(PROMPT)]), cache=cache)
    before = [np.array(a) for a in cache[0].cache]
    model(mx.array([[256]]), cache=cache)
    after = [np.array(a) for a in cache[0].cache]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)


def test_chat_turns_continue_one_cache(loaded):
    """As mlx_lm.chat does: each turn's prompt continues the cache that holds the earlier turns and answers."""
    model, tokenizer, bdh = loaded
    cache, seen = make_prompt_cache(model), []
    for turn in ("First question?", " Second one?"):
        responses = list(mlx_lm.stream_generate(model, tokenizer, turn, max_tokens=12, prompt_cache=cache))
        answer = [r.token for r in responses]
        seen += list(turn.encode())
        assert answer == bdh_steps(bdh, seen, 12)[0]
        seen += answer


def run_mlx_lm(*args):
    return subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True, text=True, env=os.environ,
                          timeout=300)


@pytest.mark.slow
def test_mlx_lm_command_line_prints_what_bdh_mlx_prints(folders):
    """The real commands: mlx_lm generate's text (between its ===== lines) is bdh-mlx generate's continuation."""
    prompt, n = " Once", 48
    done = run_mlx_lm("generate", "--model", str(folders / "base"), "--trust-remote-code", "--prompt", prompt,
                      "--max-tokens", str(n))
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout.split("==========\n")[1].removesuffix("\n")
    ours = subprocess.run([sys.executable, "-m", "bdh_mlx", "generate", "--model", str(folders / "base"), "-p", prompt,
                           "-m", str(n)], capture_output=True, text=True, env=os.environ, timeout=300)
    assert ours.stdout == prompt + text + "\n"


@pytest.mark.slow
def test_mlx_lm_refuses_the_model_file_without_trust(folders):
    done = run_mlx_lm("generate", "--model", str(folders / "base"), "--prompt", "x", "--max-tokens", "2")
    assert done.returncode != 0
    assert "requires importing and running a custom module ('bdh_model.py')" in done.stderr
