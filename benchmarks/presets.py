"""What each preset costs to train here: tokens/s of the compiled step with the fast and the stock BLAS, memory.

    python benchmarks/presets.py [--presets tiny small 25m 100m] [--steps 2] [--skip-stock 100m]

Each (preset, BLAS) pair runs in its own process (the BLAS must be chosen before MLX is imported), one after
the other, on a batch of 1 x 256 bytes (on a CPU, tokens/s barely depends on the batch at these sizes).
Prints tokens/s, the estimated and measured peak memory of a step at the recipe's batch, and how long
the README's "sensible run" of each preset would take.
"""

import argparse
import json
import os
import subprocess
import sys

# A sensible first run per preset: (steps, batch, block).
RUNS = {"tiny": (300, 16, 128), "small": (500, 8, 256), "25m": (3000, 32, 512), "100m": (3000, 32, 512)}

CHILD = """
import json, sys, time
import bdh_mlx  # first: on Linux it gives MLX the fast BLAS before mlx.core is imported
import mlx.core as mx, mlx.optimizers as optim
from bdh_mlx import BDH, BDHConfig
from bdh_mlx.training.trainer import estimate_step_memory, make_train_step
preset, steps, batch, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = BDH(BDHConfig.from_preset(preset, dropout=0.1)).train()
optimizer = optim.AdamW(1e-3)
optimizer.init(model.trainable_parameters())
step, state = make_train_step(model, optimizer)
data = mx.random.randint(0, 256, (steps + 1, 1, 1, 257)).astype(mx.uint8)
loss, _ = step(data[0]); mx.eval(state, loss)  # compile
mx.reset_peak_memory()
tic = time.perf_counter()
for i in range(steps):
    loss, _ = step(data[i + 1]); mx.eval(state, loss)
seconds = (time.perf_counter() - tic) / steps
print(json.dumps({"tokens_per_sec": 256 / seconds, "peak_1x256": mx.get_peak_memory(),
                  "estimate_recipe": estimate_step_memory(model, batch, block), "blas": str(bdh_mlx.blas.load())}))
"""


def measure(preset, steps, stock):
    env = dict(os.environ, BDH_MLX_BLAS="0" if stock else "1")
    if stock:
        env.pop("LD_PRELOAD", None)
    _, batch, block = RUNS[preset]
    done = subprocess.run([sys.executable, "-c", CHILD, preset, str(steps), str(batch), str(block)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def hours(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(RUNS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-stock", nargs="*", default=["100m"], help="presets not run with the stock BLAS")
    args = parser.parse_args()
    print("| preset | parameters | step memory at the recipe's batch (estimate) | tokens/s, fast BLAS | "
          "tokens/s, stock BLAS | sensible run | its time, fast BLAS | its time, stock BLAS |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    from bdh_mlx import BDHConfig

    for preset in args.presets:
        fast = measure(preset, args.steps, stock=False)
        stock = None if preset in args.skip_stock else measure(preset, max(1, args.steps // 2), stock=True)
        steps, batch, block = RUNS[preset]
        tokens = steps * batch * block
        params = BDHConfig.from_preset(preset).num_parameters
        stock_rate = f"{stock['tokens_per_sec']:.0f}" if stock else "not run"
        stock_time = hours(tokens / stock["tokens_per_sec"]) if stock else "-"
        print(f"| {preset} | {params:,} | {fast['estimate_recipe'] / 2**30:.2f} GiB | {fast['tokens_per_sec']:.0f} | "
              f"{stock_rate} | {steps} x {batch} x {block} | {hours(tokens / fast['tokens_per_sec'])} | {stock_time} |",
              flush=True)


if __name__ == "__main__":
    main()
