"""``bdh-mlx neurons``: build a neuron atlas of a corpus (firing rates and top contexts of every neuron).

    bdh-mlx neurons --checkpoint CKPT [--data PATH] --out atlas/     # default: the built-in corpus, as for train
    then, in Python: Atlas.load("atlas/").top_contexts(layer, head, neuron), .search("currency")
"""

from pathlib import Path

import numpy as np

from bdh_mlx.arguments import ArgumentParser, positive_int, run_command
from bdh_mlx.storage import checkpoint

from .atlas import build_atlas
from .common import InterpretError, add_common_options, as_bytes
from .stats import silent_meaning

PROG = "bdh-mlx neurons"
CORPUS = "the built-in corpus (pydoc_data)"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Build a neuron atlas: each neuron's firing rate and top contexts.")
    add_common_options(parser)
    parser.add_argument("--data", metavar="PATH", help="a text file to read (raw bytes; default: the built-in "
                        "pydoc_data corpus that train and eval use)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for atlas.npz and atlas.json")
    parser.add_argument("--top-k", type=positive_int, default=10, help="contexts kept per neuron")
    parser.add_argument("--context", type=positive_int, default=24, help="bytes kept either side of a firing")
    parser.add_argument("--max-bytes", type=positive_int, help="read only the first bytes of the text")
    return parser


def read_data(args) -> np.ndarray:
    if args.data is None:
        from bdh_mlx.training.data import default_corpus_bytes

        return as_bytes(default_corpus_bytes()[: args.max_bytes])
    from bdh_mlx.training.data import memmap_bytes

    if not Path(args.data).is_file():
        raise InterpretError(f"{args.data}: no such file")
    return np.asarray(memmap_bytes(args.data))[: args.max_bytes]


def run(args):
    data = read_data(args)
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    source = args.data or CORPUS
    atlas = build_atlas(model, data, args.top_k, args.context, args.chunk_size, not args.no_progress, source)
    atlas.save(args.out)
    n = atlas.meta["n_bytes"]
    for i, layer in enumerate(atlas.meta["layers"]):
        silent = {k: int((atlas[f"{k}_rate"][i] == 0).sum()) for k in "xy"}
        print(f"layer {i}: x active {layer['x_active']:.2%}, y active {layer['y_active']:.2%}; "
              f"{silent['x']} x and {silent['y']} y {silent_meaning(n)}")
    print(f"wrote {args.out}/ ({n:,} bytes of {source} read)")
    return atlas


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
