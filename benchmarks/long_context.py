"""One training step (forward + backward) at a long context: chunked against parallel attention.

    python benchmarks/long_context.py [--preset small] [--seq-len 8192] [--chunk-size 256]

Prints the time and peak memory of each form side by side, their ratios against the targets
(chunked at least 2x faster, at most 1/4 of the peak memory), and checks that both give the same loss.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from bdh_mlx.model import BDH, BDHConfig

SPEEDUP_TARGET = 2.0  # the chunked step against the parallel one, at T = 8192 with the small preset
MEMORY_TARGET = 0.25


def train_step_cost(config, idx, targets, weights, repeats):
    """(seconds per step, peak bytes, loss) of value_and_grad of the loss."""
    model = BDH(config)
    model.update(weights)
    loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y)[1])
    best = float("inf")
    for _ in range(repeats):
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grads = loss_and_grad(idx, targets)
        mx.eval(loss, grads)
        best = min(best, time.perf_counter() - tic)
    return best, mx.get_peak_memory(), loss.item()


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed steps per form (the best is kept)")
    p.add_argument("--skip-parallel", action="store_true", help="measure only the chunked form")
    args = p.parse_args()

    overrides = {"dropout": 0.0, "chunk_size": args.chunk_size}
    if args.n_layer:
        overrides["n_layer"] = args.n_layer
    base = BDHConfig.from_preset(args.preset, **overrides)
    mx.random.seed(0)
    weights = BDH(base).parameters()
    data = mx.random.randint(0, base.vocab_size, (args.batch_size, args.seq_len + 1))
    idx, targets = data[:, :-1], data[:, 1:]
    print(f"preset {args.preset}: {base.n_layer} layers, D {base.n_embd}, {base.n_head} heads, N {base.n_neurons}; "
          f"B {args.batch_size}, T {args.seq_len}, chunk {args.chunk_size}; device {mx.default_device()}")

    forms = ["chunked"] if args.skip_parallel else ["chunked", "parallel"]
    results = {}
    for form in forms:
        config = BDHConfig.from_dict({**base.to_dict(), "attention": form})
        results[form] = train_step_cost(config, idx, targets, weights, args.repeats)
        seconds, peak, loss = results[form]
        print(f"{form:>9}: {seconds:8.2f} s/step   peak {peak / 2**30:7.2f} GiB   loss {loss:.6f}", flush=True)
    if "parallel" in results:
        (tc, mc, lc), (tp, mp, lp) = results["chunked"], results["parallel"]
        print(f"chunked / parallel: time {tc / tp:.3f} ({tp / tc:.1f}x faster), memory {mc / mp:.3f}; "
              f"|loss difference| {abs(lc - lp):.2e}")
        print(f"targets: at least {SPEEDUP_TARGET:g}x faster ({met(tp / tc >= SPEEDUP_TARGET)}), "
              f"at most {MEMORY_TARGET:g} of the memory ({met(mc / mp <= MEMORY_TARGET)})")


if __name__ == "__main__":
    main()
