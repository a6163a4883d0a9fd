"""``bdh-mlx inspect``: activation statistics (JSON) and an HTML report of a text read by a checkpoint.

    bdh-mlx inspect --checkpoint CKPT [--text "..." | --file PATH] --json stats.json --out report.html
    (no --text or --file: the first 50,000 bytes of the built-in corpus, as for train)
"""

import json

from bdh_mlx.arguments import ArgumentParser, non_negative_int, positive_int, run_command
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_write_text

from .common import add_common_options, add_text_arguments, read_text, require, synapse_address

PROG = "bdh-mlx inspect"


def build_parser():
    parser = ArgumentParser(prog=PROG, description="Activation statistics and an HTML report of a text.")
    add_common_options(parser)
    add_text_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="write the activation statistics here")
    parser.add_argument("--out", metavar="PATH", help="write the HTML report here")
    parser.add_argument("--atlas", metavar="DIR", help="a neuron atlas (bdh-mlx neurons) to annotate the report")
    parser.add_argument("--synapse", type=synapse_address, action="append", metavar="L:H:I:J",
                        help="a synapse to track in the report (repeatable; default: those whose growth varies most)")
    parser.add_argument("--graph-edges", type=non_negative_int, default=16,
                        help="edges kept per neuron on average in the report's graphs; 0: no graph section")
    parser.add_argument("--max-report-bytes", type=positive_int, default=2000,
                        help="bytes of the text shown in the report (statistics cover all of it)")
    return parser


def print_stats(stats: dict, source: str):
    from .stats import silent_meaning

    n = stats["n_bytes"]
    print(f"{n:,} bytes of {source}")
    for i, layer in enumerate(stats["layers"]):
        print(f"layer {i}: x active {layer['x_active']:.2%}, y active {layer['y_active']:.2%}; "
              f"{len(layer['x_silent'])} x and {len(layer['y_silent'])} y {silent_meaning(n)}; always on (>= "
              f"{stats['always_on_threshold']:.0%} of bytes): {len(layer['x_always_on'])} x, "
              f"{len(layer['y_always_on'])} y")


def run(args):
    if args.out:
        require("matplotlib", "scipy", "networkx", "powerlaw")
    from .atlas import Atlas
    from .stats import Moments, activation_stats

    data, source = read_text(args)
    model = checkpoint.load_float(args.checkpoint)  # a quantized one dequantized
    if args.synapse:
        from .synapses import check_synapses

        check_synapses(model.config, args.synapse)
    atlas = Atlas.load(args.atlas) if args.atlas else None
    progress = not args.no_progress
    moments = Moments(model.config)
    stats = activation_stats(model, data, args.chunk_size, progress=progress, moments=moments)
    print_stats(stats, source)
    if args.json:
        atomic_write_text(args.json, json.dumps(stats, indent=1))
        print(f"wrote {args.json}")
    if args.out:
        from .graphs import initial_model
        from .report import write_report

        write_report(args.out, model, data, stats=stats, moments=moments, atlas=atlas, synapses=args.synapse,
                     graph_edges=args.graph_edges or None, init_model=initial_model(model.config),
                     max_bytes=args.max_report_bytes, chunk_size=args.chunk_size, progress=progress,
                     title=f"BDH: looking inside {args.checkpoint}")
        print(f"wrote {args.out}")
    return stats


def main(argv=None) -> int:
    return run_command(PROG, build_parser().parse_args, run, argv)
