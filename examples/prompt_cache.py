"""Prompt caching and branching with BDH's recurrent state.

    python examples/prompt_cache.py --checkpoint checkpoints_mlx/quickstart/best.npz

The context is read once into the cache (a fixed-size state per layer, however long the text),
saved to disk, loaded back, and continued two ways from the same point with ``cache.copy()``.
"""

import argparse
import tempfile
import time
from pathlib import Path

import bdh_mlx  # first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx

from bdh_mlx import BDHCache
from bdh_mlx.inference.generate import generate, prefill
from bdh_mlx.inference.sample_utils import make_sampler

CONTEXT = "A dragon hatchling learns to read one byte at a time. " * 40


OUT = Path(tempfile.gettempdir()) / "bdh-mlx-examples"  # never the repository


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cache-file", default=str(OUT / "context_cache.npz"),
                        help="where to save the prompt cache (default: a folder under the temporary directory)")
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args()

    model = bdh_mlx.load(args.checkpoint)
    model.eval()
    cache = model.make_cache(1)
    tic = time.perf_counter()
    prefill(model, mx.array([list(CONTEXT.encode())]), cache)
    seconds = time.perf_counter() - tic
    print(f"read {len(CONTEXT)} bytes of context in {seconds:.2f} s; cache: {cache.nbytes / 1e6:.1f} MB")

    cache.save(args.cache_file)
    cache = BDHCache.load(args.cache_file, config=model.config)
    print(f"saved and reloaded {args.cache_file}: the model has seen {cache.offset.item()} bytes")

    sampler = make_sampler(temperature=0.8, top_p=0.95)
    for seed in (1, 2):
        branch = cache.copy()  # each continuation starts from the same state
        text = generate(model, "\nThe", max_tokens=args.max_tokens, sampler=sampler, seed=seed, cache=branch)
        print(f"--- branch with seed {seed}:\nThe{text}")


if __name__ == "__main__":
    main()
