"""Generation with the recurrent state: ``generate_step`` -> ``stream_generate`` -> ``generate``.

The prompt is prefilled through the cache in chunks (the chunked attention form, never one
T x T matrix); then each new token costs the same whatever the length of the text, because
the cache is a fixed-size state per layer. Tokens are raw bytes, decoded to UTF-8 incrementally.

Command line: ``bdh-mlx generate --checkpoint CKPT.npz --prompt TEXT [options]``.
"""

import codecs
import sys
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
from tqdm import tqdm

from bdh_mlx.arguments import (
    ArgumentParser,
    add_checkpoint_argument,
    add_dtype_argument,
    non_negative_float,
    non_negative_int,
    number_in,
    positive_float,
    positive_int,
    run_command,
    seed_int,
)
from bdh_mlx.errors import BDHError
from bdh_mlx.inference.sample_utils import make_logits_processors, make_sampler
from bdh_mlx.inference.template import apply_template, end_of_response
from bdh_mlx.model import BDH
from bdh_mlx.modeling.cache import BDHCache
from bdh_mlx.storage.checkpoint import load
from bdh_mlx.storage.files import COMPUTE_DTYPES, eval_mode

DEFAULT_PREFILL_CHUNK = 512
PROGRESS_MIN_TOKENS = 8 * DEFAULT_PREFILL_CHUNK  # longer prompts show a progress bar while they are read


@dataclass
class GenerationResponse:
    """One step of ``stream_generate``.

    ``text`` is the new text this token completes (possibly empty: a multi-byte character
    still incomplete, or text held back because it may begin a stop string).
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length" or None


def encode_prompt(prompt, vocab_size: int = 256) -> list:
    """A prompt as token ids: a ``str`` (UTF-8 bytes), ``bytes`` or a sequence of ints."""
    if hasattr(prompt, "encode") and hasattr(prompt, "decode"):  # mlx-lm's generate(model, tokenizer, prompt)
        raise BDHError("bdh-mlx's generate functions take (model, prompt, ...): no tokenizer (token ids are bytes); "
                       "drop the tokenizer argument")
    if isinstance(prompt, str):
        try:
            prompt = prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BDHError(
                f"the prompt holds {prompt[e.start]!r} at position {e.start}, which UTF-8 cannot encode "
                f"(a lone surrogate); pass bytes to use raw bytes"
            ) from None
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise BDHError("the prompt is empty; give at least one character")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise BDHError(f"prompt token {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return tokens


def prefill(model: BDH, tokens: mx.array, cache: BDHCache, chunk_size: int = DEFAULT_PREFILL_CHUNK, progress=None):
    """Feed ``tokens`` (B, T) through ``cache`` in pieces of ``chunk_size``; the last logits (B, V).

    ``progress(n)`` is called after each piece of ``n`` tokens.
    """
    T = tokens.shape[1]
    for start in range(0, T, chunk_size):
        logits, _ = model(tokens[:, start : start + chunk_size], cache=cache)
        mx.eval(cache.state)  # the logits of all but the last piece are never computed
        if progress is not None:
            progress(min(chunk_size, T - start))
    return logits[:, -1]


def _row(cache: BDHCache, i: int) -> BDHCache:
    return BDHCache([s[i : i + 1] for s in cache.states], cache.offset[i : i + 1])


def _prefill_rows(model, prompts, cache, chunk_size, progress):
    """Prefill each prompt with its own batch-1 cache, then stack the rows into ``cache`` (in place)."""
    if len(prompts) == 1:
        return prefill(model, mx.array(prompts), cache, chunk_size, progress)
    rows = [_row(cache, i) for i in range(len(prompts))]
    logits = [prefill(model, mx.array([p]), row, chunk_size, progress) for p, row in zip(prompts, rows, strict=True)]
    stacked = BDHCache.stack(rows)
    cache.states, cache.offset = stacked.states, stacked.offset
    return mx.concatenate(logits, axis=0)


def _sample(sampler, logits_processors, logits, history, key):
    """``(tokens, logprobs, the next key)``: the processors applied to ``logits``, then the sampler (with a
    split of ``key``, when sampling with explicit keys)."""
    for process in logits_processors:
        logits = process(history, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if key is None:
        return sampler(logprobs), logprobs, None
    key, subkey = mx.random.split(key)
    return sampler(logprobs, key=subkey), logprobs, key


def _batch_steps(
    model: BDH,
    prompts: list,
    *,
    sampler: Callable | None = None,
    logits_processors: list | None = None,
    max_tokens: int = 256,
    cache: BDHCache | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    seed: int | None = None,
    prompt_progress_callback: Callable | None = None,
    prompt_logits: mx.array | None = None,
) -> Generator:
    """Yield ``(tokens (B,), logprobs (B, V))`` for a batch of token lists, decoded in lockstep.

    With ``prompt_logits`` (B, V), the prompts are already in ``cache`` (see ``prefill``): decoding starts at once.
    """
    sampler = sampler or make_sampler(0.0)
    logits_processors = logits_processors or []
    if cache is None:
        cache = model.make_cache(len(prompts))
    if cache.batch_size != len(prompts):
        raise BDHError(f"the cache holds {cache.batch_size} rows but {len(prompts)} prompts were given")
    key = None if seed is None else mx.random.key(seed)
    # What each row has seen, for the logits processors: left-padding with the row's first token
    # changes nothing, because a token counts once however often it appears.
    width = max(map(len, prompts))
    history = mx.array([[p[0]] * (width - len(p)) + p for p in prompts], dtype=mx.int32)

    sample = partial(_sample, sampler, logits_processors)
    with eval_mode(model):
        total, done = sum(map(len, prompts)), 0

        def progress(n):
            nonlocal done
            done += n
            if prompt_progress_callback is not None:
                prompt_progress_callback(done, total)

        if prompt_logits is None:
            logits = _prefill_rows(model, prompts, cache, prefill_chunk, progress)
        else:
            logits = prompt_logits
        y, logprobs, key = sample(logits, history, key)
        mx.async_eval(y, logprobs)
        for n in range(max_tokens):
            current = y, logprobs
            if n + 1 < max_tokens:  # queue the next token before handing out this one
                if logits_processors:
                    history = mx.concatenate([history, y[:, None].astype(mx.int32)], axis=1)
                logits, _ = model(y[:, None], cache=cache)
                y, logprobs, key = sample(logits[:, -1], history, key)
                mx.async_eval(y, logprobs, *cache.state)
            yield current


SAMPLING_ARGS = ("temperature", "top_p", "min_p", "top_k")
STEP_ARGS = ("sampler", "logits_processors", "max_tokens", "cache", "prefill_chunk", "seed",
             "prompt_progress_callback", "prompt_logits")
# mlx-lm's spellings of bdh-mlx's keywords
RENAMED_ARGS = {"temp": "temperature", "prompt_cache": "cache", "prefill_step_size": "prefill_chunk"}
PENALTY_ARGS = ("repetition_penalty", "repetition_context_size")
# mlx-lm keywords with no meaning for BDH, and why
REFUSED_ARGS = {
    "max_kv_size": "BDH's state has a fixed size whatever the length of the text: there is no KV cache to bound",
    "kv_bits": "BDH has no KV cache to quantize (its state is a fixed-size float32 matrix per layer)",
    "kv_group_size": "BDH has no KV cache to quantize (its state is a fixed-size float32 matrix per layer)",
    "quantized_kv_start": "BDH has no KV cache to quantize (its state is a fixed-size float32 matrix per layer)",
    "draft_model": "speculative decoding is not supported",
    "num_draft_tokens": "speculative decoding is not supported",
    "input_embeddings": "BDH reads bytes: give the prompt as text, bytes or byte values",
}


def _with_sampler(kwargs: dict, caller: str = "generate_step") -> dict:
    """``kwargs`` in bdh-mlx's spelling: mlx-lm's names renamed; ``temperature``/``top_p``/``min_p``/``top_k``
    made into a ``sampler`` and the repetition penalty into a logits processor; anything else refused by a
    ``BDHError`` that names it."""
    for name in kwargs:
        if name in REFUSED_ARGS:
            raise BDHError(f"{caller}() does not take {name}: {REFUSED_ARGS[name]}")
    for old, new in RENAMED_ARGS.items():
        if old in kwargs:
            if new in kwargs:
                raise BDHError(f"give either {new} or {old} (mlx-lm's name for it), not both")
            kwargs[new] = kwargs.pop(old)
    unknown = sorted(set(kwargs) - {*STEP_ARGS, *SAMPLING_ARGS, *PENALTY_ARGS})
    if unknown:
        accepted = ", ".join([*STEP_ARGS, *SAMPLING_ARGS, *PENALTY_ARGS, *RENAMED_ARGS])
        raise BDHError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}; it takes {accepted}")
    given = {k: kwargs.pop(k) for k in SAMPLING_ARGS if k in kwargs}
    if given:
        if kwargs.get("sampler") is not None:
            raise BDHError(f"give either sampler or {', '.join(given)}, not both")
        kwargs["sampler"] = make_sampler(**given)
    penalty = {k: kwargs.pop(k) for k in PENALTY_ARGS if k in kwargs}
    if penalty:
        kwargs["logits_processors"] = [*(kwargs.get("logits_processors") or []), *make_logits_processors(**penalty)]
    return kwargs


def generate_step(model: BDH, prompt_tokens, **kwargs) -> Generator:
    """Yield ``(token, logprobs (V,))`` one at a time after ``prompt_tokens`` (a str, bytes or ints).

    Keyword arguments: ``sampler`` (``sampler(logprobs, key=None)``; default greedy) or mlx-lm's
    ``temperature``, ``top_p``, ``min_p``, ``top_k``; ``logits_processors``, ``max_tokens``, ``cache``
    (advanced in place; it may already hold a context, e.g. one loaded from disk), ``prompt_logits``
    (the prompt is already in ``cache``), ``prefill_chunk``, ``seed`` (reproducible sampling with
    explicit keys: the global ``mx.random`` state is left alone) and ``prompt_progress_callback(processed, total)``.
    mlx-lm's spellings work too (``temp``, ``prompt_cache``, ``prefill_step_size``, ``repetition_penalty``,
    ``repetition_context_size``); its keywords that mean nothing for BDH (``max_kv_size``, ``kv_bits``, ...) and
    unknown ones are refused by a BDHError naming them.
    """
    tokens = encode_prompt(prompt_tokens, model.config.vocab_size)
    for y, logprobs in _batch_steps(model, [tokens], **_with_sampler(kwargs)):
        yield y.item(), logprobs[0]


def _split_at_stop(text: str, stop: list, final: bool):
    """``(text to emit, text to hold back, stopped)``: the text before the first stop string.

    While not ``final``, the longest ending of ``text`` that could begin a stop string is held back.
    """
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    held = 0 if final else max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], text[len(text) - held :], False


def stream_generate(model: BDH, prompt, max_tokens: int = 256, stop: Iterable[str] = (), prompt_seconds: float = 0.0,
                    **kwargs) -> Generator:
    """Yield a ``GenerationResponse`` per generated token.

    ``prompt_seconds``: the time the prompt took when it was prefilled beforehand (``prompt_logits``), counted
    in ``prompt_tps``.

    Bytes are decoded incrementally: an incomplete multi-byte character waits for its next
    bytes, invalid bytes become U+FFFD. Generation ends after ``max_tokens`` or at the first
    stop string: the text up to the stop string is emitted, the stop string itself is not.
    Other keyword arguments go to ``generate_step``.
    """
    tokens = encode_prompt(prompt, model.config.vocab_size)
    stop = [s for s in stop if s]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""
    tic = time.perf_counter()
    for n, (token, logprobs) in enumerate(generate_step(model, tokens, max_tokens=max_tokens, **kwargs), start=1):
        if n == 1:
            prompt_tps = len(tokens) / (prompt_seconds + time.perf_counter() - tic)
            tic = time.perf_counter()
        last = n == max_tokens
        held += decoder.decode(bytes([token]) if token < 256 else b"\xff", final=last)
        text, held, stopped = _split_at_stop(held, stop, final=last)
        yield GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=len(tokens),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason="stop" if stopped else "length" if last else None,
        )
        if stopped:
            return


def generate(model: BDH, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """The continuation of ``prompt`` as one string; with ``verbose``, stream it to stdout and statistics to stderr."""
    pieces = []
    response = None
    for response in stream_generate(model, prompt, max_tokens=max_tokens, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print(flush=True)
        print(
            f"==========\n"
            f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens-per-sec\n"
            f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens-per-sec\n"
            f"Peak memory: {response.peak_memory * 1e3:.1f} MB",
            file=sys.stderr,
            flush=True,
        )
    return "".join(pieces)


def batch_generate(model: BDH, prompts: list, max_tokens: int = 256, stop: Iterable[str] = (), **kwargs) -> list:
    """Continue prompts of different lengths together; one string per prompt.

    Each prompt is prefilled with its own cache, then all rows decode in lockstep.
    Each row is cut before its first stop string. Other keyword arguments as ``generate_step``.
    """
    rows = [encode_prompt(p, model.config.vocab_size) for p in prompts]
    steps = [y for y, _ in _batch_steps(model, rows, max_tokens=max_tokens, **_with_sampler(kwargs, "batch_generate"))]
    columns = mx.stack(steps, axis=1).tolist() if steps else [[] for _ in rows]
    texts = [bytes(t if t < 256 else 0xFF for t in row).decode("utf-8", errors="replace") for row in columns]
    return [_split_at_stop(text, list(stop), final=True)[0] for text in texts]


# --- Command line ------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(
        prog="bdh-mlx generate",
        description="Continue a prompt with a trained model: the prompt and the continuation go to stdout, "
        "the statistics to stderr.",
    )
    add_checkpoint_argument(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", "-p", help="text to continue; '-' reads standard input")
    text.add_argument("--instruction", help="an instruction for a fine-tuned model: wrapped in its prompt template, "
                      "generation stops at its end-of-response marker")
    p.add_argument("--input", help="with --instruction: the input (context) of the instruction")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=256, help="bytes to generate")
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=[], help="stop before this string (not printed); repeatable")
    add_dtype_argument(p)
    p.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, help="prompt bytes per step")
    p.add_argument("--save-cache", default=None, metavar="NPZ", help="save the state after the prompt to this file")
    p.add_argument("--load-cache", default=None, metavar="NPZ",
                   help="start from a saved state; the prompt continues it")
    return p


def add_sampling_arguments(p):
    """Temperature, top-k/p, min-p, repetition penalty and seed (``generate`` and ``chat``); greedy by default, as
    the Python API and mlx-lm."""
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temperature", "--temp", type=non_negative_float, default=0.0,
                          help="0 (the default) is greedy")
    sampling.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely bytes (0: off)")
    sampling.add_argument("--top-p", type=number_in(0, 1, lo_open=True), default=1.0,
                          help="nucleus sampling, in (0, 1] (1: off)")
    sampling.add_argument("--min-p", type=number_in(0, 1), default=0.0, help="min-p sampling, in [0, 1] (0: off)")
    sampling.add_argument("--repetition-penalty", type=positive_float, default=None, help="e.g. 1.1 (off if not given)")
    sampling.add_argument("--repetition-context-size", type=positive_int, default=20,
                          help="bytes the repetition penalty looks back")
    sampling.add_argument("--seed", type=seed_int, default=None, help="seed for reproducible sampling")


def sampling_options(args) -> dict:
    """The ``sampler`` and ``logits_processors`` the sampling arguments describe."""
    return {
        "sampler": make_sampler(args.temperature, args.top_p, args.min_p, args.top_k),
        "logits_processors": make_logits_processors(args.repetition_penalty, args.repetition_context_size),
    }


def run(args):
    """Prefill the prompt, save the state if asked, then decode: prompt and text to stdout, statistics to stderr."""
    if args.input is not None and args.instruction is None:
        raise BDHError("--input goes with --instruction")
    model = load(args.checkpoint, compute_dtype=COMPUTE_DTYPES[args.dtype])
    stop = list(args.stop)
    if args.instruction is not None:  # a fine-tuned model: its own template, up to its end-of-response marker
        prompt = apply_template(model, args.instruction, args.input).encode("utf-8", errors="surrogateescape")
        stop.append(end_of_response(model))
    elif args.prompt == "-":
        prompt = sys.stdin.buffer.read()
    else:
        prompt = args.prompt.encode("utf-8", errors="surrogateescape")
    tokens = encode_prompt(prompt, model.config.vocab_size)
    cache = model.make_cache(1) if args.load_cache is None else BDHCache.load(args.load_cache, model.config, 1)
    if args.instruction is None:  # an instruction's answer is printed alone
        sys.stdout.write(bytes(tokens).decode("utf-8", errors="replace"))
        sys.stdout.flush()
    with eval_mode(model), tqdm(total=len(tokens), unit="B", unit_scale=True, desc="prompt", leave=False,
                                disable=len(tokens) <= PROGRESS_MIN_TOKENS, file=sys.stderr) as bar:
        tic = time.perf_counter()
        logits = prefill(model, mx.array([tokens]), cache, args.prefill_chunk, progress=bar.update)
        prompt_seconds = time.perf_counter() - tic
    if args.save_cache is not None:
        cache.save(args.save_cache)
    generate(
        model,
        tokens,
        max_tokens=args.max_tokens,
        verbose=True,
        **sampling_options(args),
        cache=cache,
        prompt_logits=logits,
        prompt_seconds=prompt_seconds,
        seed=args.seed,
        stop=stop,
    )


def main(argv=None) -> int:
    return run_command("bdh-mlx generate", build_parser().parse_args, run, argv)


if __name__ == "__main__":
    main()
