"""``bdh-mlx neurons``: build a neuron atlas of a corpus (firing rates and top contexts of every neuron).

    bdh-mlx neurons --checkpoint CKPT --data PATH --out atlas/
    then, in Python: Atlas.load("atlas/").top_contexts(layer, head, neuron), .search("currency")
"""

from pathlib import Path

import numpy as np

from bdh_mlx.arguments import ArgumentParser, positive_int, run_command
from bdh_mlx.storage import checkpoint
from bdh_mlx.training.data import memmap_bytes

from .atlas import build_atlas
from .common import InterpretError, add_common_options

PROG = "bdh-mlx neurons"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Build a neuron atlas: each neuron's firing rate and top contexts.")
    add_common_options(parser)
    parser.add_argument("--data", required=True, metavar="PATH", help="a text file to read (raw bytes)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for atlas.npz and atlas.json")
    parser.add_argument("--top-k", type=positive_int, default=10, help="contexts kept per neuron")
    parser.add_argument("--context", type=positive_int, default=24, help="bytes kept either side of a firing")
    parser.add_argument("--max-bytes", type=positive_int, help="read only the first bytes of the file")
    return parser


def run(args):
    if not Path(args.data).is_file():
        raise InterpretError(f"{args.data}: no such file")
    data = np.asarray(memmap_bytes(args.data))[: args.max_bytes]
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    atlas = build_atlas(model, data, args.top_k, args.context, args.chunk_size, not args.no_progress, args.data)
    atlas.save(args.out)
    for i, layer in enumerate(atlas.meta["layers"]):
        print(f"layer {i}: x active {layer['x_active']:.2%}, y active {layer['y_active']:.2%}")
    print(f"wrote {args.out}/ ({atlas.meta['n_bytes']:,} bytes read)")
    return atlas


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
