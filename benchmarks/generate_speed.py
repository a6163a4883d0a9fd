"""Per-token decode time with the recurrent cache against recomputing the whole prefix, by context length.

    python benchmarks/generate_speed.py [--preset 25m] [--contexts 256 1024 4096 16384] [--tokens 16]
    python benchmarks/generate_speed.py --contexts 256 --densities 0.025 0.05 0.1 --recompute-max 0 --official-max 0
    python benchmarks/generate_speed.py --sparsity-of checkpoints_mlx/small-pydoc/best.npz --contexts 256

Decoding is timed side by side with four steps: "dense" and "sparse" are the step the model takes on this
device (on the CPU in float32, the numpy kernel of ``inference/cpu_kernel.py``), "MLX dense" and "MLX sparse" the one of
MLX operations that other devices take. The sparse steps (S, encoder_v and the decoder read only at the
neurons that fire) are forced here whatever the density, so the crossover shows; "speedup" is dense / sparse,
and "bound" the most it can be in memory moved: the bytes the dense step moves over the sparse step's
(``moved_bytes``) at the fractions of x and of RoPE pairs that fire in the model's parallel pass over a short text.
"GB/s" is the memory the dense step must move (the layer's weights read by each of the n_layer layers, the
state read and written once) divided by its time, printed next to the machine's copy bandwidth (a numpy copy
of a 200 MB array, read + write, timed in turns with the steps so that both see the same load).
``--densities``: a model of the preset's shape whose encoder columns are zeroed so that about that fraction
of x is non-zero (random weights are not sparse: about half of x is);
``--sparsity-of``: the measured fraction of non-zero x (and of firing RoPE pairs, the rows of S the sparse
step reads) per layer of a trained checkpoint.

The context is built once, by chunked prefill through the cache, growing from one length to the
next; decoding is timed only after each prefill (``generate_step`` from a copy of the cache).
Recomputation is one full forward pass over context + 1 tokens (the model's own attention form,
``auto``), timed up to ``--recompute-max``. "official" is how the official code generates: the same full
forward pass in eager PyTorch (no grad, dense T x T attention), with this model's weights, timed up to
``--official-max`` (needs ``pip install torch==2.13.0``; the model is ``blas.py``'s, written from the spec).
"""

import argparse
import functools
import time

import bdh_mlx  # noqa: F401  first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from bdh_mlx import load
from bdh_mlx.inference.engines import CPUKernel, MLXDense, MLXSparse, choose_engine
from bdh_mlx.inference.generate import generate_step, prefill
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.modeling.cache import KEPT_WRITES
from bdh_mlx.storage.files import COMPUTE_DTYPES, eval_mode


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


COPY_BYTES = 200_000_000  # larger than any CPU cache


@functools.cache
def copy_arrays():
    """A source and a destination of ``COPY_BYTES``, both written before any timing (a fresh array's page
    faults would be timed too), made once, at the first copy."""
    source = np.random.default_rng(0).random(COPY_BYTES // 4, dtype=np.float32)
    return source, np.ones_like(source)


def copy_seconds() -> float:
    """Seconds for numpy to copy ``COPY_BYTES`` (the copy bandwidth is ``2 * COPY_BYTES`` over this)."""
    source, destination = copy_arrays()
    tic = time.perf_counter()
    np.copyto(destination, source)
    return time.perf_counter() - tic


def step_bytes(model, cache, weight_reads=None) -> int:
    """The least memory one decoding step moves: the weights read by each layer, the state read and written once.

    The shared layer's weights (100 MB at 25m) are applied n_layer times and fit in no CPU cache, so they
    are read n_layer times (the embedding only for one row). ``weight_reads=1`` counts them once, as if
    they stayed in cache from layer to layer (the issue's 504 MB at 25m).
    """
    params = dict(tree_flatten(model.parameters()))
    embedding = params.pop("embed.weight").nbytes // model.config.vocab_size
    reads = model.config.n_layer if weight_reads is None else weight_reads
    weights = reads * sum(v.nbytes for k, v in params.items() if k != "lm_head")
    return embedding + weights + params["lm_head"].nbytes + 2 * sum(s.nbytes for s in cache.states)


def moved_bytes(model, cache, x_fraction=None, pair_fraction=None) -> int:
    """The memory a step moves as the steps make it. Per layer: the whole encoder (x needs all of it), encoder_v
    and the decoder at the ``x_fraction`` of neurons that fire, S at the rows of the ``pair_fraction`` of RoPE
    pairs that fire, the kept writes, and S read and written once every ``KEPT_WRITES`` tokens to add them.
    Fractions per layer; None: all (the dense step)."""
    c = model.config
    params = dict(tree_flatten(model.parameters()))
    fixed = params["embed.weight"].nbytes // c.vocab_size + params["lm_head"].nbytes
    firing = params["encoder_v"].nbytes + params["decoder"].nbytes
    kept = 4 * cache.batch_size * KEPT_WRITES * (c.n_head * c.n_neurons + c.n_embd)  # Q and V, float32
    return fixed + sum(
        params["encoder"].nbytes + firing * x + s.nbytes * (pairs + 2 / KEPT_WRITES) + kept
        for x, pairs, s in zip(x_fraction or [1] * c.n_layer, pair_fraction or [1] * c.n_layer, cache.states,
                               strict=True)
    )


def step_engines(dtype) -> dict:
    """Name: decoding engine, the sparse ones taken whatever the density. "dense" and "sparse" are the CPU
    kernel's where it applies (the CPU in float32), MLX's elsewhere."""
    fast = CPUKernel if mx.default_device() == mx.cpu and dtype == mx.float32 else MLXSparse
    return {"MLX dense": MLXDense(), "MLX sparse": MLXSparse(1.0), "dense": fast(0.0), "sparse": fast(1.0)}


def step_seconds(model, cache, token, n_tokens, repeats):
    """Seconds per token with each of ``step_engines``, and of a "copy" (``copy_seconds``); the best of
    ``repeats`` runs, taken in turns."""
    best = {"copy": float("inf")}
    models = {name: with_engine(model, engine) for name, engine in step_engines(model.compute_dtype).items()}
    for _ in range(repeats):
        for name, stepping in models.items():
            seconds = decode_seconds_per_token(stepping, cache, token, n_tokens, 1)
            best[name] = min(best.get(name, seconds), seconds)
        best["copy"] = min(best["copy"], *(copy_seconds() for _ in range(3)))
    return best


def with_engine(model, engine):
    """A model with ``model``'s weights (the same arrays), config and compute dtype, decoding with ``engine``."""
    other = BDH(model.config, compute_dtype=model.compute_dtype, engine=engine)
    other.update(model.parameters())
    return other.eval()


def with_density(model, density, seed=0):
    """Zero encoder columns so that about ``density`` of x is non-zero (a kept neuron is active half the time)."""
    nh, D, N = model.encoder.shape
    keep = np.random.default_rng(seed).random((nh, 1, N)) < 2 * density
    model.encoder = model.encoder * mx.array(keep)
    return model


def x_sparsity(model, text: bytes):
    """Per layer: fraction of non-zero x, and of RoPE pairs (2i, 2i+1) with an entry non-zero."""
    activations = []
    model(mx.array([list(text)]), activations=activations)
    x = [np.array(a["x"] != 0) for a in activations]
    return [a.mean() for a in x], [(a[..., 0::2] | a[..., 1::2]).mean() for a in x]


def recompute_seconds(model, idx):
    """Seconds for the next token's logits by a full forward pass over ``idx``."""
    mx.eval(idx)
    tic = time.perf_counter()
    logits, _ = model(idx)
    mx.eval(logits[:, -1])
    return time.perf_counter() - tic


def official_decoder(model):
    """A function timing the official way to get the next token (``(idx) -> seconds``), with this model's weights."""
    import torch
    from blas import torch_bdh

    torch.manual_seed(0)
    official = torch_bdh(model.config).eval()
    params = dict(tree_flatten(model.parameters()))
    with torch.no_grad():
        for name, value in params.items():
            target = official.embed.weight if name == "embed.weight" else getattr(official, name)
            target.copy_(torch.from_numpy(np.array(value.astype(mx.float32))))

    def seconds(idx):
        tokens = torch.from_numpy(np.array(idx).astype(np.int64))
        with torch.no_grad():
            tic = time.perf_counter()
            logits = official(tokens)[:, -1]
            elapsed = time.perf_counter() - tic
        want = np.array(model(idx)[0][:, -1])
        if not np.allclose(logits.numpy(), want, atol=1e-3, rtol=1e-3):
            raise SystemExit(f"the PyTorch model's logits differ from MLX's by {np.abs(logits.numpy() - want).max()}")
        return elapsed

    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="25m")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens timed per context")
    p.add_argument("--repeats", type=int, default=3, help="decoding runs per context (the best is kept)")
    p.add_argument("--recompute-max", type=int, default=4096, help="longest context to time recomputation at")
    p.add_argument("--official-max", type=int, default=1024, help="longest context to time the official code at")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32")
    p.add_argument(
        "--densities",
        type=float,
        nargs="*",
        default=[],
        help="also time models whose x has about this fraction non-zero",
    )
    p.add_argument("--sparsity-of", metavar="CKPT", help="print the non-zero fraction of x per layer of a checkpoint")
    args = p.parse_args()

    if args.sparsity_of:
        model = load(args.sparsity_of)
        from pydoc_data.topics import topics  # held-out-like English text the model was not timed on

        with eval_mode(model):
            x, pairs = x_sparsity(model, topics[sorted(topics)[-1]].encode()[:512])
        print(
            f"{args.sparsity_of}: non-zero x per layer {' '.join(f'{f:.3f}' for f in x)}; "
            f"active RoPE pairs (rows the sparse step touches) {' '.join(f'{f:.3f}' for f in pairs)}"
        )

    config = BDHConfig.from_preset(args.preset, dropout=0.0)
    for density in [None, *args.densities]:
        mx.random.seed(0)
        dtype = COMPUTE_DTYPES[args.dtype]
        model = BDH(config, compute_dtype=dtype, engine=choose_engine(config, dtype))
        if density is not None:
            with_density(model, density)
        model.eval()
        mx.eval(model.parameters())
        x, pairs = x_sparsity(model, bytes(range(32, 127)) * 3)
        print(
            f"preset {args.preset} ({config.num_parameters / 1e6:.1f} M parameters, {config.n_layer} layers, "
            f"N {config.n_neurons}), {args.dtype}, random weights"
            f"{'' if density is None else ' with encoder columns zeroed'}: {np.mean(x):.1%} of x non-zero, "
            f"{np.mean(pairs):.1%} of RoPE pairs firing; device {mx.default_device()}"
        )
        time_contexts(model, args, official_decoder(model) if args.official_max > 0 else None, (x, pairs))


def time_contexts(model, args, official, sparsity):
    """One row per context; ``sparsity``: per layer, the fractions of non-zero x and of firing pairs."""
    config = model.config
    contexts = sorted(args.contexts)
    idx = mx.random.randint(0, config.vocab_size, (1, contexts[-1] + 1), key=mx.random.key(1))
    header = [
        "context",
        "+prefill s",
        "MLX dense ms",
        "dense ms/tok",
        "GB/s",
        "copy GB/s",
        "of copy",
        "(weights once)",
        "sparse ms/tok",
        "speedup",
        "bound",
        "MLX sparse ms",
        "recompute ms/tok",
        "ratio",
        "official ms/tok",
        "ratio",
        "cache MB",
    ]
    widths = [8, 10, 13, 13, 7, 10, 8, 14, 14, 8, 7, 14, 17, 8, 16, 8, 9]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    cache = model.make_cache(1)
    cached = {}
    done = 0
    for context in contexts:
        tic = time.perf_counter()
        prefill(model, idx[:, done:context], cache, args.prefill_chunk)
        prefill_s, done = time.perf_counter() - tic, context
        mx.clear_cache()  # give back the prefill's buffers before timing decoding
        times = step_seconds(model, cache, idx[0, context].item(), args.tokens, args.repeats)
        dense, sparse = times["dense"], times["sparse"]
        cached[context] = dense
        bandwidth, copy = step_bytes(model, cache) / dense / 1e9, 2 * COPY_BYTES / times["copy"] / 1e9
        once = step_bytes(model, cache, weight_reads=1) / dense / 1e9
        bound = moved_bytes(model, cache) / moved_bytes(model, cache, *sparsity)
        if context <= args.recompute_max:
            recompute = recompute_seconds(model, idx[:, : context + 1])
            recompute_text, ratio = f"{recompute * 1e3:17.1f}", f"{recompute / dense:7.0f}x"
        else:
            recompute_text, ratio = f"{'skipped':>17}", f"{'-':>8}"
        if official is not None and context <= args.official_max:
            official_s = official(idx[:, : context + 1])
            official_text = f"{official_s * 1e3:16.1f} {official_s / dense:7.0f}x"
        else:
            official_text = f"{'skipped':>16} {'-':>8}"
        print(
            f"{context:>8} {prefill_s:>10.1f} {times['MLX dense'] * 1e3:>13.1f} {dense * 1e3:>13.1f} "
            f"{bandwidth:>7.1f} {copy:>10.1f} {bandwidth / copy:>8.0%} {once / copy:>14.0%} {sparse * 1e3:>14.1f} "
            f"{dense / sparse:>7.2f}x {bound:>6.2f}x {times['MLX sparse'] * 1e3:>14.1f} "
            f"{recompute_text} {ratio} {official_text} {cache.nbytes / 1e6:>9.1f}",
            flush=True,
        )
    first, last = contexts[0], contexts[-1]
    if last != first:
        print(f"cached per-token time at {last} / at {first}: {cached[last] / cached[first]:.2f}")
    skipped = [c for c in contexts if c > args.recompute_max]
    if skipped:
        print(f"recompute skipped at {', '.join(map(str, skipped))} (raise --recompute-max to time it)")


if __name__ == "__main__":
    main()
