"""Decoding and training speed of this tree against an earlier revision, side by side in one run.

For a refactoring: both versions run the same measurements through the public API (``bdh_mlx.load``,
``BDH``, ``model(idx, cache=...)``, ``bdh-mlx train``), each in its own process, in turns (before, after,
before, ...), so both see the same machine load; the best of the rounds is kept, and the ratio printed.

    python benchmarks/before_after.py --before 7e7b389 --rounds 3
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
import bdh_mlx  # first: the fast BLAS before mlx.core
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from bdh_mlx import BDH, BDHConfig, load, save

what, path = sys.argv[1], sys.argv[2]
if what == "decode":  # ms per byte after a 256-byte context, the engine load() gives on this device
    model = load(path)
    cache = model.make_cache(1)
    idx = mx.random.randint(0, 256, (1, 257), key=mx.random.key(0))
    mx.eval(model(idx[:, :256], cache=cache)[0], cache.state)
    token = idx[:, 256:257]
    for _ in range(4):
        mx.eval(model(token, cache=cache)[0], cache.state)
    start = time.perf_counter()
    for _ in range(24):
        logits, _ = model(token, cache=cache)
        mx.eval(logits, cache.state)
    print(json.dumps({"value": (time.perf_counter() - start) / 24 * 1e3}))
else:  # s per compiled training step (value_and_grad + AdamW), small preset, batch 8 x 256
    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("small"))
    model.train()
    optimizer = optim.AdamW(1e-3)
    state = [model.state, optimizer.state, mx.random.state]

    def loss(model, x, y):
        return model(x, y)[1]

    def step(x, y):
        value, grads = nn.value_and_grad(model, loss)(model, x, y)
        optimizer.update(model, grads)
        return value
    step = mx.compile(step, inputs=state, outputs=state)
    data = mx.random.randint(0, 256, (8, 257), key=mx.random.key(1))
    for _ in range(2):
        mx.eval(step(data[:, :-1], data[:, 1:]), state)
    start = time.perf_counter()
    for _ in range(4):
        mx.eval(step(data[:, :-1], data[:, 1:]), state)
    print(json.dumps({"value": (time.perf_counter() - start) / 4}))
"""


def run_python(tree: Path, args: list) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, *args], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return out.stdout


def measure(tree: Path, what: str, checkpoint: Path, workdir: Path) -> float:
    if what == "train CLI":  # s for a whole 40-step tiny run through the command line
        out = workdir / f"run-{time.monotonic_ns()}"
        start = time.perf_counter()
        run_python(tree, ["-m", "bdh_mlx", "train", "--preset", "tiny", "--steps", "40", "--batch-size", "8",
                          "--block-size", "64", "--eval-every", "20", "--eval-batches", "2", "--sample-tokens", "0",
                          "--no-progress", "--out", str(out)])
        return time.perf_counter() - start
    return json.loads(run_python(tree, ["-c", MEASURE, what, str(checkpoint)]).splitlines()[-1])["value"]


MEASURES = {"decode": "ms per byte, 25m, 256 bytes of context", "train": "s per step, small, 8 x 256",
            "train CLI": "s for 40 tiny steps through bdh-mlx train"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a git revision of this repository")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
        try:
            checkpoint = tmp / "25m.npz"
            run_python(ROOT, ["-c", "import bdh_mlx, mlx.core as mx; mx.random.seed(0); "
                              f"bdh_mlx.save(bdh_mlx.BDH(bdh_mlx.BDHConfig.from_preset('25m')), {str(checkpoint)!r})"])
            best = {(tree, what): float("inf") for tree in ("before", "after") for what in MEASURES}
            for _ in range(args.rounds):
                for what in MEASURES:
                    for name, tree in (("before", before), ("after", ROOT)):
                        best[name, what] = min(best[name, what], measure(tree, what, checkpoint, tmp))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    print(f"before: {args.before}, after: the working tree; best of {args.rounds} rounds taken in turns")
    print(f"{'measure':<46} {'before':>9} {'after':>9} {'after / before':>15}")
    for what, unit in MEASURES.items():
        b, a = best["before", what], best["after", what]
        print(f"{what + ' (' + unit + ')':<46} {b:9.3f} {a:9.3f} {a / b:15.3f}")


if __name__ == "__main__":
    main()
