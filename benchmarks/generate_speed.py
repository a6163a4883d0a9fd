"""Per-token decode time with the recurrent cache against recomputing the whole prefix, by context length.

    python benchmarks/generate_speed.py [--preset 25m] [--contexts 256 1024 4096 16384] [--tokens 16]

The context is built once, by chunked prefill through the cache, growing from one length to the
next; decoding is timed only after each prefill (``generate_step`` from a copy of the cache).
Recomputation is one full forward pass over context + 1 tokens (the model's own attention form:
parallel up to 4 chunks, chunked beyond), timed up to ``--recompute-max``.
"""

import argparse
import time

import mlx.core as mx

from bdh_mlx.generate import generate_step, prefill
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.utils import COMPUTE_DTYPES


def decode_seconds_per_token(model, cache, token, n_tokens, repeats):
    """Seconds per token of ``generate_step`` decoding (greedy) from copies of ``cache``; best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        steps = generate_step(model, [token], cache=cache.copy(), max_tokens=n_tokens + 2)
        next(steps)  # the first token comes from the one-token prefill, not from decoding
        next(steps)
        tic = time.perf_counter()
        for _ in steps:
            pass
        best = min(best, (time.perf_counter() - tic) / n_tokens)
    return best


def recompute_seconds(model, idx):
    """Seconds for the next token's logits by a full forward pass over ``idx``."""
    mx.eval(idx)
    tic = time.perf_counter()
    logits, _ = model(idx)
    mx.eval(logits[:, -1])
    return time.perf_counter() - tic


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="25m")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens timed per context")
    p.add_argument("--repeats", type=int, default=3, help="decoding runs per context (the best is kept)")
    p.add_argument("--recompute-max", type=int, default=4096, help="longest context to time recomputation at")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32")
    args = p.parse_args()

    config = BDHConfig.from_preset(args.preset, dropout=0.0)
    mx.random.seed(0)
    model = BDH(config).set_compute_dtype(COMPUTE_DTYPES[args.dtype])
    model.eval()
    mx.eval(model.parameters())
    contexts = sorted(args.contexts)
    idx = mx.random.randint(0, config.vocab_size, (1, contexts[-1] + 1))
    print(f"preset {args.preset} ({config.num_parameters / 1e6:.1f} M parameters, {config.n_layer} layers, "
          f"N {config.n_neurons}), {args.dtype}, random weights, device {mx.default_device()}")
    header = ["context", "+prefill s", "cached ms/tok", "recompute ms/tok", "ratio", "cache MB"]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, [8, 10, 14, 17, 8, 9], strict=True)))

    cache = model.make_cache(1)
    cached = {}
    done = 0
    for context in contexts:
        tic = time.perf_counter()
        prefill(model, idx[:, done:context], cache, args.prefill_chunk)
        prefill_s, done = time.perf_counter() - tic, context
        mx.clear_cache()  # give back the prefill's buffers before timing decoding
        cached[context] = decode_seconds_per_token(model, cache, idx[0, context].item(), args.tokens, args.repeats)
        if context <= args.recompute_max:
            recompute = recompute_seconds(model, idx[:, : context + 1])
            recompute_text, ratio = f"{recompute * 1e3:17.1f}", f"{recompute / cached[context]:7.0f}x"
        else:
            recompute_text, ratio = f"{'skipped':>17}", f"{'-':>8}"
        print(f"{context:>8} {prefill_s:>10.1f} {cached[context] * 1e3:>14.1f} {recompute_text} {ratio} "
              f"{cache.nbytes / 1e6:>9.1f}", flush=True)
    first, last = contexts[0], contexts[-1]
    print(f"cached per-token time at {last} / at {first}: {cached[last] / cached[first]:.2f}")
    skipped = [c for c in contexts if c > args.recompute_max]
    if skipped:
        print(f"recompute skipped at {', '.join(map(str, skipped))} (raise --recompute-max to time it)")


if __name__ == "__main__":
    main()
