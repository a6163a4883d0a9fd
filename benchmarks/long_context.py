"""Long contexts: time and peak memory of the parallel and chunked attention forms, forward and training step.

    python benchmarks/long_context.py [--preset 25m] [--n-layer 1] [--seq-lens 2048 8192 32768]

For each T, the forward pass (no gradient) and one training step (forward + backward) of each form,
side by side, with the loss difference between forms. A run whose estimated peak memory exceeds
``--memory-limit`` is skipped and its estimate printed: the parallel form holds T x T scores per head.
"""

import argparse
import time

import bdh_mlx  # noqa: F401  first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx
import mlx.nn as nn

from bdh_mlx.model import BDH, BDHConfig


def parallel_bytes(config, B, T, train):
    """Estimated peak of the parallel form: per layer, the scores (twice: product and mask) and x, y, x*y."""
    per_layer = B * config.n_head * (2 * T * T + 3 * T * config.n_neurons) * 4
    return per_layer * (config.n_layer if train else 1)


def cost(config, weights, idx, targets, train, repeats):
    """(seconds, peak bytes, loss): a forward pass, or value_and_grad of the loss."""
    model = BDH(config)
    model.update(weights)
    model.train(train)
    step = nn.value_and_grad(model, lambda x, y: model(x, y)[1]) if train else (lambda x, y: (model(x, y)[1], None))
    best = float("inf")
    for _ in range(repeats):
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grads = step(idx, targets)
        mx.eval(loss, grads)
        best = min(best, time.perf_counter() - tic)
    return best, mx.get_peak_memory(), loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="25m")
    p.add_argument("--n-layer", type=int, default=1, help="override the preset's layer count (time scales with it)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (the best is kept)")
    p.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    p.add_argument("--memory-limit", type=float, default=16.0, help="GiB: skip runs estimated to need more")
    args = p.parse_args()

    overrides = {"dropout": 0.0, "chunk_size": args.chunk_size}
    if args.n_layer:
        overrides["n_layer"] = args.n_layer
    base = BDHConfig.from_preset(args.preset, **overrides)
    mx.random.seed(0)
    weights = BDH(base).parameters()
    print(f"preset {args.preset}: {base.n_layer} layers, D {base.n_embd}, {base.n_head} heads, N {base.n_neurons}; "
          f"B {args.batch_size}, chunk {args.chunk_size}; device {mx.default_device()}")
    print(f"{'T':>6} {'mode':>8} {'parallel s':>11} {'peak GiB':>9} {'chunked s':>10} {'peak GiB':>9} "
          f"{'speedup':>8} {'memory':>7} {'|dloss|':>8}")
    for T in args.seq_lens:
        data = mx.random.randint(0, base.vocab_size, (args.batch_size, T + 1), key=mx.random.key(T))
        idx, targets = data[:, :-1], data[:, 1:]
        for mode in args.modes:
            train = mode == "train"
            results = {}
            for form in ("parallel", "chunked"):
                config = BDHConfig.from_dict({**base.to_dict(), "attention": form})
                need = parallel_bytes(config, args.batch_size, T, train) / 2**30
                if form == "parallel" and need > args.memory_limit:
                    results[form] = f"skipped: needs ~{need:.0f} GiB"
                else:
                    results[form] = cost(config, weights, idx, targets, train, args.repeats)
            par, chunk = results["parallel"], results["chunked"]
            chunk_text = f"{chunk[0]:>10.2f} {chunk[1] / 2**30:>9.2f}"
            if isinstance(par, str):
                print(f"{T:>6} {mode:>8} {par:>21} {chunk_text}", flush=True)
            else:
                print(f"{T:>6} {mode:>8} {par[0]:>11.2f} {par[1] / 2**30:>9.2f} {chunk_text} "
                      f"{par[0] / chunk[0]:>7.2f}x {chunk[1] / par[1]:>7.2f} {abs(par[2] - chunk[2]):>8.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
