"""fp32 against 8-bit and 4-bit weights: bits per byte on held-out text, file size, peak memory, decode speed.

    python benchmarks/quantize.py [--checkpoint checkpoints_mlx/small-pydoc/best.npz] [--group-size 64]
    python benchmarks/quantize.py --preset 25m --eval-batches 0     # speed and size only (random weights)

Bits per byte: ``bdh-mlx eval``'s validation set (the default corpus's held-out 10%, the same fixed
crops). Decode: greedy ``generate_step`` after a short prompt; peak memory is MLX's peak while decoding
(weights + state + buffers). Targets: 8-bit within 0.5% of fp32 bits per byte, 4-bit within 3%,
file size about bits / 32 of fp32.
"""

import argparse
import tempfile
import time
from pathlib import Path

import bdh_mlx  # noqa: F401  first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx

from bdh_mlx import BDH, BDHConfig, load, quantize, save
from bdh_mlx.inference.generate import generate_step
from bdh_mlx.training import evaluate
from bdh_mlx.training.data import eval_batches, load_corpus

TARGETS = {8: 0.005, 4: 0.03}


def decode_ms_per_byte(model, n_tokens):
    """Greedy decode time per byte (the first token, from the prompt's prefill, is not timed); peak MB."""
    steps = generate_step(model, b"def ", max_tokens=n_tokens + 1)
    next(steps)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - tic) / n_tokens * 1e3, mx.get_peak_memory() / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints_mlx/small-pydoc/best.npz", help="a float checkpoint")
    p.add_argument("--preset", default=None, help="use a random model of this preset instead of --checkpoint")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (0: skip bits per byte)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64, help="decoded bytes timed")
    args = p.parse_args()

    if args.preset:
        mx.random.seed(0)
        base = BDH(BDHConfig.from_preset(args.preset, dropout=0.0))
        source = f"preset {args.preset}, random weights"
    else:
        base, source = load(args.checkpoint), args.checkpoint
    batches = None
    if args.eval_batches:
        corpus = load_corpus(None)  # the default corpus, as bdh-mlx eval
        batches = eval_batches(corpus.val, args.batch_size, args.block_size, args.eval_batches)
    c = base.config
    print(f"{source}: {c.num_parameters / 1e6:.2f} M parameters (D {c.n_embd}, N {c.n_neurons}); "
          f"group size {args.group_size}; device {mx.default_device()}")
    header = ["weights", "bits/byte", "vs fp32", "file MB", "vs fp32", "peak MB", "ms/byte"]
    print(" ".join(f"{h:>10}" for h in header))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (32, 8, 4):
            path = Path(tmp) / f"{bits}.npz"
            model = load(args.checkpoint) if not args.preset else BDH(c)
            model.update(base.parameters())
            if bits < 32:
                quantize(model, bits, args.group_size)
            save(model, path)
            del model
            model = load(path)
            bpb = evaluate.evaluate_loss(model, batches)[1] if batches is not None else float("nan")
            ms, peak = decode_ms_per_byte(model, args.tokens)
            size = path.stat().st_size / 1e6
            rows[bits] = bpb, size
            ref_bpb, ref_size = rows[32]
            print(f"{'fp32' if bits == 32 else f'{bits}-bit':>10} {bpb:>10.4f} {bpb / ref_bpb - 1:>+10.2%} "
                  f"{size:>10.2f} {size / ref_size:>10.3f} {peak:>10.1f} {ms:>10.2f}", flush=True)
    if batches is not None:
        for bits, tolerance in TARGETS.items():
            change = rows[bits][0] / rows[32][0] - 1
            print(f"target {bits}-bit within {tolerance:.1%} of fp32 bits per byte: {change:+.2%} "
                  f"({'met' if change <= tolerance else 'MISSED'})")


if __name__ == "__main__":
    main()
