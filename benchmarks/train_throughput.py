"""Training throughput: the compiled step of ``bdh-mlx train`` against a plain eager step, side by side.

The eager step is what a straightforward port does: ``value_and_grad``, ``optimizer.update`` and
``mx.eval`` every step, no ``mx.compile``. Same config, data and optimizer for both.

    python benchmarks/train_throughput.py --preset small --batch-size 8 --block-size 256 --steps 10
"""

import argparse
import time

import bdh_mlx  # noqa: F401  first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bdh_mlx.model import BDH, PRESETS, BDHConfig
from bdh_mlx.training.evaluate import next_byte_loss
from bdh_mlx.training.trainer import make_optimizer, make_train_step


def compiled_step(model, optimizer):
    step, state = make_train_step(model, optimizer)

    def run(batch):
        loss, _ = step(batch[None])
        mx.eval(state, loss)

    return run


def eager_step(model, optimizer):
    loss_and_grad = nn.value_and_grad(model, next_byte_loss)

    def run(batch):
        loss, grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)

    return run


def measure(make_step, config, dtype, batches, warmup):
    mx.random.seed(0)
    model = BDH(config, compute_dtype=dtype)
    optimizer = make_optimizer(1e-3)
    optimizer.init(model.trainable_parameters())
    step = make_step(model, optimizer)
    for batch in batches[:warmup]:
        step(batch)
    mx.reset_peak_memory()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    seconds = time.perf_counter() - start
    tokens = (len(batches) - warmup) * batches[0].shape[0] * (batches[0].shape[1] - 1)
    return tokens / seconds, mx.get_peak_memory() / 2**20, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=2, help="alternate the variants this many times; best kept")
    args = p.parse_args(argv)

    config = BDHConfig.from_preset(args.preset, dropout=args.dropout)
    dtype = getattr(mx, args.dtype)
    rng = np.random.default_rng(0)
    batches = [
        mx.array(rng.integers(0, 256, size=(args.batch_size, args.block_size + 1)).astype(np.uint8))
        for _ in range(args.warmup + args.steps)
    ]
    print(f"device {mx.default_device()}, preset {args.preset} ({config.num_parameters:,} parameters, "
          f"n_layer {config.n_layer}), batch {args.batch_size} x {args.block_size}, {args.dtype}, "
          f"{args.steps} timed steps")
    results = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, make in (("eager", eager_step), ("compiled", compiled_step)):
            results[name].append(measure(make, config, dtype, batches, args.warmup))
    best = {name: max(runs) for name, runs in results.items()}
    print(f"{'step':<10}{'tokens/s':>12}{'peak MiB':>12}{'s/step':>10}")
    for name, (tps, peak, seconds) in best.items():
        print(f"{name:<10}{tps:>12,.0f}{peak:>12,.0f}{seconds / args.steps:>10.3f}")
    ratio = best["compiled"][0] / best["eager"][0]
    print(f"compiled / eager: {ratio:.2f}x tokens/s, {best['compiled'][1] / best['eager'][1]:.2f}x peak memory")


if __name__ == "__main__":
    main()
